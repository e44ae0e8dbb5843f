"""HA-GAN inference: whole-volume generation, memory-bounded slab generation, hierarchical encoding.

Both generation paths apply G^H to the *complete* G^A feature map (no sub-volume selection), as
the paper serves HA-GAN.  Three exact rewrites make them cheaper than the plain network:

* **Folded upsample + conv.**  A nearest x2 upsample followed by a 3x3x3 conv (padding 1) equals,
  for each of the eight output parities (a, b, c), a 2x2x2 conv on the un-upsampled input.  All
  eight are one conv with 8*Cout output channels on the low-resolution grid (padding 1), followed
  by an interleave: 64 instead of 216 multiply-adds per low-resolution voxel and input channel
  pair (3.4x fewer), and no upsampled tensor is ever made.
* **Transposed convs in G^H.**  G^H stages with several output channels (both paths) run
  the same upsample + conv as one stride-2 transposed conv with derived 4x4x4 weights
  (``TransposedUpConv``): oneDNN writes the interleaved output itself, so the parity copies go; the
  activations are then channels-last.  GroupNorm statistics come from per-channel chunked sums
  (``_group_stats``) in any layout.
* **Slabs with global GroupNorm statistics.**  ``mode="slab"`` runs G^H along depth, slab by slab,
  each slab with the one-row halo per stage its receptive field needs.  GroupNorm statistics are
  gathered over the whole volume in a first pass (float64 sums), so the result equals whole-volume
  generation while peak memory follows the slab size.  This is the default when the whole volume
  would not fit the memory budget (512^3 on a 24 GiB machine or a 16 GB GPU).

**Precision** (``set_precision``): ``fp32``, or ``bf16``: the convolution weights converted once and
the activations of G^A and G^H held in bfloat16, GroupNorm statistics gathered in float32/float64
and the tanh output returned as float32.  ``auto`` takes bf16 where the CPU has bf16 arithmetic
(AVX-512 BF16 or AMX, as oneDNN reports it) and fp32 elsewhere (AVX2-only CPUs, where bf16
convolutions fall back to a kernel tens of times slower, and CUDA until measured there).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from model.base import Progress, VolumeModel, check_latent
from model.hagan.config import HAGANConfig
from model.hagan.networks import HAGAN, parameter_counts, upconv_weight

_PARITIES = [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)]
# 3 taps of a conv on the upsampled grid -> 2 taps on the original grid, per output parity
_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)

DEFAULT_BUDGET_MB = 1024  # a model's memory_budget_mb unless set (the worker: VOXGEN_MEMORY_BUDGET_MB)


def fold_upconv(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[Co, Ci, 3, 3, 3] conv after a nearest x2 upsample -> [8*Co, Ci, 2, 2, 2] conv (parity-major)."""
    w = weight.detach().double()
    parts = [torch.einsum("pk,ql,rm,oiklm->oipqr", _TAPS[a], _TAPS[b], _TAPS[c], w) for a, b, c in _PARITIES]
    return torch.cat(parts, 0).to(weight.dtype).contiguous(), bias.detach().repeat(8).contiguous()


PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 convolutions natively (oneDNN: AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(option: str | None, device: torch.device) -> str:
    """'auto' / None -> bf16 on a CPU with native bf16, else fp32; 'fp32' and 'bf16' as given."""
    option = option or "auto"
    if option not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {option!r}")
    if option == "auto":
        return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"
    return option


class FoldedUpConv:
    """Exact ``conv3d(upsample_nearest_x2(x), w, b, padding=1)`` computed on the input grid."""

    def __init__(self, conv: torch.nn.Conv3d, dtype: torch.dtype = torch.float32) -> None:
        self.cout = conv.out_channels
        w, b = fold_upconv(conv.weight, conv.bias)
        self.weight, self.bias = w.to(dtype), b.to(dtype)

    def to(self, device: torch.device) -> FoldedUpConv:
        self.weight, self.bias = self.weight.to(device), self.bias.to(device)
        return self

    def __call__(self, x: torch.Tensor, chunk_bytes: int = 64 * 2**20) -> torch.Tensor:
        """Runs in depth chunks of the input so the 8-parity intermediate stays small."""
        bsz, cin, d, h, w = x.shape
        co = self.cout
        out = x.new_empty(bsz, co, d, 2, h, 2, w, 2)
        row_bytes = x.element_size() * bsz * (8 * co * (h + 1) * (w + 1) + 2 * cin * h * w)
        rows = max(1, min(d, chunk_bytes // max(1, row_bytes)))
        for s in range(0, d, rows):
            e = min(d, s + rows)
            # input rows s-1 .. e, with a zero row where that runs past the volume (the conv's padding)
            xin = x[:, :, max(0, s - 1) : min(d, e + 1)]
            if s == 0 or e == d:
                xin = F.pad(xin, (0, 0, 0, 0, int(s == 0), int(e == d)))
            # channels-last 3D is about 2x faster for these convs on the CPU backend; same values
            xin = xin.contiguous(memory_format=torch.channels_last_3d)
            y = F.conv3d(xin, self.weight, self.bias, padding=(0, 1, 1))  # [B, 8*Co, e-s+1, h+1, w+1]
            n = e - s
            for i, (a, b, c) in enumerate(_PARITIES):
                out[:, :, s:e, a, :, b, :, c] = y[:, i * co : (i + 1) * co, a : a + n, b : b + h, c : c + w]
            del y, xin
        return out.view(bsz, co, 2 * d, 2 * h, 2 * w)


class TransposedUpConv:
    """The same ``conv3d(upsample_nearest_x2(x), w, b, padding=1)`` as one stride-2 transposed conv
    with derived 4x4x4 weights (model/hagan/networks.py ``upconv_weight``): oneDNN writes the
    interleaved output itself (channels-last), so no parity copies; the same sums in another order.
    Faster than ``FoldedUpConv`` where there are several output channels, slower for G^H's last
    one-channel stage (``TCONV_MIN_OUT``)."""

    def __init__(self, conv: torch.nn.Conv3d, dtype: torch.dtype = torch.float32) -> None:
        self.cout = conv.out_channels
        self.weight = upconv_weight(conv.weight.detach().double()).to(dtype).contiguous()
        self.bias = conv.bias.detach().to(dtype).contiguous()

    def to(self, device: torch.device) -> TransposedUpConv:
        self.weight, self.bias = self.weight.to(device), self.bias.to(device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last_3d)
        return F.conv_transpose3d(x, self.weight, self.bias, stride=2, padding=1)


TCONV_MIN_OUT = 8  # G^H stages with at least this many output channels run as TransposedUpConv


def _gn_affine(norm: torch.nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, channel) scale and shift equal to GroupNorm with the given group statistics."""
    g = norm.num_groups
    c = norm.num_channels
    rstd = torch.rsqrt(var + norm.eps)  # [B, G] float64
    scale = rstd.repeat_interleave(c // g, dim=1) * norm.weight.double()
    shift = norm.bias.double() - mean.repeat_interleave(c // g, dim=1) * scale
    return scale.float(), shift.float()


class HAGANModel(VolumeModel[HAGANConfig, HAGAN]):
    """A loaded HA-GAN model: the surface the worker and the CLI use.

    ``generate(z)`` -> [n, 1, R, R, R] float32 in [-1, 1] on the CPU; ``encode(x)`` -> [n, latent].
    """

    family = "hagan"
    config_class = HAGANConfig
    net_class = HAGAN
    count_parameters = staticmethod(parameter_counts)

    def __init__(self, net: HAGAN, device: str | torch.device = "cpu") -> None:
        super().__init__(net, device)
        self._folded: dict[str, Any] | None = None
        self.precision = "fp32"
        self.memory_budget_mb = DEFAULT_BUDGET_MB  # G^H runs in slabs when the whole volume needs more

    def set_precision(self, option: str | None = "auto") -> str:
        """Generation precision: 'fp32', 'bf16' or 'auto' (see the module docstring); returns the
        one chosen.  Encoding stays fp32."""
        chosen = resolve_precision(option, self.device)
        if chosen != self.precision:
            self.precision, self._folded = chosen, None
        return chosen

    @property
    def _dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    @property
    def class_names(self) -> list[str]:
        return list(self.config.class_names)

    # ---------------------------------------------------------------- generation
    def _fold(self) -> dict[str, Any]:
        if self._folded is None:
            with torch.no_grad():
                self._folded = self._make_folded()
        return self._folded

    def _make_folded(self) -> dict[str, Any]:
        ga, gh, dt = self.net.ga, self.net.gh, self._dtype
        return {
            "ga": [
                FoldedUpConv(c, dt).to(self.device) if up else None
                for c, up in zip(ga.convs, ga.upsample_before, strict=True)
            ],
            # G^H (whole volume and slabs): transposed convs where they are faster (no interleave copies)
            "gh": [
                (TransposedUpConv if c.out_channels >= TCONV_MIN_OUT else FoldedUpConv)(c, dt).to(self.device)
                for c in gh.convs
            ],
            # the other G^A convs' weights in the generation dtype (the module keeps fp32 for encoding)
            "ga_plain": [
                None if up else (c.weight.detach().to(dt), c.bias.detach().to(dt), c.padding)
                for c, up in zip(ga.convs, ga.upsample_before, strict=True)
            ],
        }

    @torch.inference_mode()
    def features(self, z: torch.Tensor, label: torch.Tensor | int | None = None) -> torch.Tensor:
        """G^A with folded upsample-convs: [n, latent] -> [n, 2c, R/4, R/4, R/4] (R/8 at 512)."""
        net = self.net
        ga = net.ga
        x = net.latent_input(z.to(self.device, torch.float32), None if label is None else torch.as_tensor(label))
        h = ga.fc(x).view(x.shape[0], ga.c0, 4, 4, 4).to(self._dtype)
        folded = self._fold()
        for fold, plain, norm in zip(folded["ga"], folded["ga_plain"], ga.norms, strict=True):
            h = fold(h) if fold is not None else F.conv3d(h, plain[0], plain[1], padding=plain[2])
            h = F.relu_(_group_norm_(h, norm))
        return h

    def whole_volume_bytes(self) -> int:
        """Rough peak bytes of G^H run on the whole volume (one sample)."""
        f = self.config.resolution // self.net.gh.scale
        cin = self.net.gh.convs[0].in_channels
        peak, d = 0, f
        for conv in self.net.gh.convs:
            co = conv.out_channels
            peak = max(peak, 4 * (cin * d**3 + 8 * co * (d + 1) ** 3 + co * (2 * d) ** 3))
            cin, d = co, 2 * d
        return peak

    @torch.inference_mode()
    def generate(
        self,
        z: torch.Tensor,
        label: torch.Tensor | int | None = None,
        *,
        mode: str = "auto",
        budget_mb: int | None = None,
        slab_rows: int | None = None,
        progress: Progress | None = None,
    ) -> torch.Tensor:
        """Latents [n, latent] -> volumes [n, 1, R, R, R] (float32, [-1, 1], on the CPU).

        ``mode``: "whole" (G^H on the whole feature map at once), "slab" (memory-bounded, equal
        output), or "auto" (whole when it fits ``budget_mb``, else slab).
        """
        check_latent(z, self.latent_dim)
        budget = (budget_mb or self.memory_budget_mb) * 2**20
        if mode == "auto":
            mode = "whole" if self.whole_volume_bytes() <= budget else "slab"
        if mode not in ("whole", "slab"):
            raise ValueError(f"mode must be 'auto', 'whole' or 'slab', got {mode!r}")
        n = z.shape[0]
        labels = None
        if label is not None:
            labels = torch.as_tensor(label).long().reshape(-1).expand(n)
        r = self.config.resolution
        out = torch.empty(n, 1, r, r, r, dtype=torch.float32)
        for i in range(n):
            lab = None if labels is None else labels[i : i + 1]
            f = self.features(z[i : i + 1], lab)
            step = None if progress is None else (lambda d, t, s, i=i: progress(i * t + d, n * t, s))
            if mode == "whole":
                v = self._gh_whole(f)
                if step:
                    step(1, 1, "generate")
            else:
                v = self._gh_slabs(f, budget, slab_rows, step)
            out[i] = v[0].float().cpu()
        return out

    def _gh_whole(self, f: torch.Tensor) -> torch.Tensor:
        gh = self.net.gh
        h = f
        for k, fold in enumerate(self._fold()["gh"]):
            h = fold(h)
            if k < len(gh.norms):  # GroupNorm + ReLU in place: no second full-size tensor
                h = F.relu_(_group_norm_(h, gh.norms[k]))
            else:
                h = torch.tanh_(h)
        return h

    # --- slab path -----------------------------------------------------------------------
    def _stage(self, f: torch.Tensor, k: int, a: int, b: int, stats: list, activate: bool = True) -> torch.Tensor:
        """Output rows [a, b) (depth) of G^H stage k, computed from the feature map f."""
        n_in = f.shape[2] * 2**k
        lo, hi = max(0, (a - 1) // 2), min(n_in, b // 2 + 1)
        x = f[:, :, lo:hi] if k == 0 else self._stage(f, k - 1, lo, hi, stats)
        y = self._fold()["gh"][k](x)[:, :, a - 2 * lo : b - 2 * lo]
        del x
        if not activate:
            return y
        gh = self.net.gh
        if k < len(gh.norms):
            return F.relu_(_scale_shift_(y, *stats[k]))
        return torch.tanh_(y)

    def _gh_slabs(self, f: torch.Tensor, budget: int, slab_rows: int | None, progress: Progress | None) -> torch.Tensor:
        gh = self.net.gh
        n_stages = len(gh.convs)
        f_rows = f.shape[2]
        # rows of the widest stage output per slab from the budget (~3 live copies of a row)
        row_bytes = max(
            4 * 3 * conv.out_channels * (f.shape[3] * 2 ** (k + 1)) ** 2 * 2 ** (n_stages - 1 - k)
            for k, conv in enumerate(gh.convs)
        )
        total_rows = f_rows * 2**n_stages
        rows = slab_rows or max(2, min(total_rows, int(budget // max(row_bytes, 1))))
        stats: list = []
        n_norm = len(gh.norms)
        total_steps = n_norm + 1
        for k in range(n_norm):  # pass k: GroupNorm statistics of stage k over the whole volume
            norm = gh.norms[k]
            g = norm.num_groups
            s1 = torch.zeros(1, g, dtype=torch.float64, device=f.device)
            s2 = torch.zeros_like(s1)
            n_k = f_rows * 2 ** (k + 1)
            step = max(1, (rows * n_k) // total_rows)
            count = 0
            for a in range(0, n_k, step):
                y = self._stage(f, k, a, min(n_k, a + step), stats, activate=False)
                yg = y.reshape(1, g, -1)
                s1 += yg.sum(-1, dtype=torch.float64)
                s2 += (yg.double() ** 2).sum(-1) if yg.numel() < 2**26 else _chunked_sq_sum(yg)
                count += yg.shape[-1]
                del y, yg
            mean = s1 / count
            var = (s2 / count - mean**2).clamp_min(0)
            stats.append(_gn_affine(norm, mean, var))
            if progress:
                progress(k + 1, total_steps, "statistics")
        out = torch.empty(1, 1, total_rows, f.shape[3] * 2**n_stages, f.shape[4] * 2**n_stages, device=f.device)
        for a in range(0, total_rows, rows):
            b = min(total_rows, a + rows)
            out[:, :, a:b] = self._stage(f, n_stages - 1, a, b, stats)
        if progress:
            progress(total_steps, total_steps, "generate")
        return out

    # ---------------------------------------------------------------- encoding
    @torch.inference_mode()
    def encode(self, x: torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
        """Volumes [n, 1, R, R, R] in model space -> latents [n, latent] (hierarchical encoder)."""
        r = self.config.resolution
        if x.ndim != 5 or tuple(x.shape[1:]) != (1, r, r, r):
            raise ValueError(f"volume must have shape [n, 1, {r}, {r}, {r}], got {list(x.shape)}")
        zs = []
        for i in range(x.shape[0]):
            f = self.net.encode_features(x[i : i + 1].to(self.device, torch.float32), slabs_per_call=2)
            zs.append(self.net.eg(f).float().cpu())
            if progress:
                progress(i + 1, x.shape[0], "encode")
        return torch.cat(zs, 0)

    def reconstruct(self, x: torch.Tensor, label: torch.Tensor | int | None = None, **kw: Any) -> torch.Tensor:
        return self.generate(self.encode(x), label, **kw)


STATS_ROWS = 4096  # voxels per chunk of the GroupNorm statistics (a chunk of 32 channels: 512 KiB)


def _group_stats(h: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, group) mean and variance of h [n, c, d, h, w] in float64, in any memory layout
    and for any float dtype.

    Each channel's sum and centred sum of squares are taken over chunks of ``STATS_ROWS`` voxels, in
    float32 (a bf16 chunk is read as float32) as a matrix-vector product, and combined over the chunks
    in float64 (Chan et al.'s pairwise update); a group's variance is the mean of its channels' plus
    the variance of their means (equal voxel counts).  ``torch.var_mean`` over a channels-last tensor
    (the transposed convs' output) reads it at a stride and took ~0.5 s for 32 channels at 128^3 where
    this takes ~30 ms."""
    n, c = h.shape[:2]
    if h.is_contiguous(memory_format=torch.channels_last_3d) and not h.is_contiguous():
        x = h.permute(0, 2, 3, 4, 1).reshape(n, -1, c)  # [n, voxels, c], a view
    else:
        x = h.reshape(n, c, -1).transpose(1, 2)  # [n, voxels, c], a view of a contiguous tensor
    v = x.shape[1]
    ones = torch.ones(1, min(STATS_ROWS, v), dtype=torch.float32, device=h.device)
    total = torch.zeros(n, c, dtype=torch.float64, device=h.device)  # sum of x
    m2 = torch.zeros_like(total)  # sum of the chunks' centred squares
    sq_means = torch.zeros_like(total)  # sum of count * chunk mean^2
    for a in range(0, v, STATS_ROWS):
        xb = x[:, a : a + STATS_ROWS].float()  # no copy for float32
        o = ones[:, : xb.shape[1]]
        s = o @ xb  # [n, 1, c]
        mb = s / xb.shape[1]
        d = xb - mb
        m2 += (o @ (d * d))[:, 0].double()
        total += s[:, 0].double()
        sq_means += mb[:, 0].double().square() * xb.shape[1]
    mean = total / v
    var = (m2 + sq_means - v * mean.square()).clamp_min(0) / v
    mean, var = mean.view(n, groups, -1), var.view(n, groups, -1)
    gmean = mean.mean(-1)
    return gmean, var.mean(-1) + (mean - gmean[..., None]).square().mean(-1)


def _group_norm_(h: torch.Tensor, norm: torch.nn.GroupNorm) -> torch.Tensor:
    """GroupNorm of h in place (statistics in float32/64, then one scale-and-shift pass).  The scale
    and shift are cast to h's dtype: a float32 operand would make a bf16 tensor's in-place update
    promote every element (about 3x slower), for no accuracy the bf16 result can keep."""
    return _scale_shift_(h, *_gn_affine(norm, *_group_stats(h, norm.num_groups)))


def _scale_shift_(h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """h * scale + shift in place, per (sample, channel), in h's dtype."""
    return h.mul_(scale.to(h.dtype)[:, :, None, None, None]).add_(shift.to(h.dtype)[:, :, None, None, None])


def _chunked_sq_sum(yg: torch.Tensor) -> torch.Tensor:
    total = torch.zeros(yg.shape[:2], dtype=torch.float64, device=yg.device)
    for s in range(0, yg.shape[-1], 2**24):
        total += (yg[..., s : s + 2**24].double() ** 2).sum(-1)
    return total


@torch.inference_mode()
def reference_generate(net: HAGAN, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
    """The plain path, as the authors' code runs it in eval mode: G^A, then G^H with explicit
    upsampling, on the whole feature map.  For tests and benchmarks."""
    return net.gh(net.features(z, label))
