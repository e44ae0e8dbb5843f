"""HA-GAN's loaded model: whole-volume generation, memory-bounded slab generation, hierarchical
encoding.

Both generation paths apply G^H to the *complete* G^A feature map (no sub-volume selection), as
the paper serves HA-GAN.  The exact rewrites that make them cheaper than the plain
network are in model/hagan/folding.py.

**Slabs with global GroupNorm statistics.**  ``mode="slab"`` runs G^H along depth, slab by slab,
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

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from model.base import Progress, VolumeModel, check_latent
from model.hagan.config import HAGANConfig
from model.hagan.folding import (
    TCONV_MIN_OUT,
    FoldedUpConv,
    TransposedUpConv,
    gn_affine,
    group_norm_,
    group_stats,
    scale_shift_,
)
from model.hagan.networks import CL_MIN_VOXELS, HAGAN, mixed_layout, parameter_counts, to_slabs
from model.precision import resolve_precision

DEFAULT_BUDGET_MB = 1024  # a model's memory_budget_mb unless set (the worker: VOXGEN_MEMORY_BUDGET_MB)


class HAGANModel(VolumeModel[HAGANConfig, HAGAN]):
    """A loaded HA-GAN model: the surface the worker and the CLI use.

    ``generate(z)`` -> [n, 1, R, R, R] float32 in [-1, 1] on the CPU; ``encode(x)`` -> [n, latent].
    """

    family = "hagan"
    config_class = HAGANConfig
    net_class = HAGAN
    count_parameters = staticmethod(parameter_counts)
    generator_parts = ("ga", "gh")  # G^L draws the low-resolution volume that only training uses
    encoder_parts = ("eh", "eg")

    def __init__(self, net: HAGAN, device: str | torch.device = "cpu") -> None:
        super().__init__(net, device)
        self._folded: dict[str, Any] | None = None
        self._enc: tuple[str, dict[str, list[Any]]] | None = None  # encoder weights in the encoding dtype
        self.precision = "fp32"
        self.memory_budget_mb = DEFAULT_BUDGET_MB  # G^H runs in slabs when the whole volume needs more

    def set_precision(self, option: str | None = "auto") -> str:
        """Generation precision: 'fp32', 'bf16' or 'auto' (see the module docstring); returns the
        one chosen.  Encoding follows it: in bf16, E^H and E^G run with bf16 weights and activations
        (GroupNorm statistics and affine in float32), latents returned as float32."""
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
        # G^A's upsample-convs on inputs of 8^3 and more: transposed convs in float32 (on a 2-core AVX2
        # EPYC at the authors' width: 121/236/445 ms against 153/264/562 ms folded for the 8^3, 16^3
        # and 32^3 inputs, and no parity copies; on the 4^3 input the folded conv is faster, 67 against
        # 80 ms).  bf16 keeps the folded convs it was measured with on the bf16 CPUs (RESULTS.md).
        ga_up, grid = [], 4
        for c, up in zip(ga.convs, ga.upsample_before, strict=True):
            tconv = dt == torch.float32 and grid >= 8
            ga_up.append(((TransposedUpConv if tconv else FoldedUpConv)(c, dt).to(self.device)) if up else None)
            grid *= 2 if up else 1
        return {
            "ga": ga_up,
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
            h = F.relu_(_gn(h, norm))
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
            if mode == "whole":  # on the CPU in float32 the last stage writes into the result itself
                v = self._gh_whole(f, out[i : i + 1] if out.device == f.device and f.dtype == out.dtype else None)
                if step:
                    step(1, 1, "generate")
            else:  # on the CPU the slabs land in the result itself: no second full-size volume
                v = self._gh_slabs(f, budget, slab_rows, step, out[i : i + 1] if out.device == f.device else None)
            if v.data_ptr() != out[i].data_ptr():
                out[i] = v[0].float().cpu()
        return out

    def _gh_whole(self, f: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """G^H on the whole feature map; ``out`` (a [1, 1, R, R, R] tensor of f's dtype and device)
        receives the volume when the last stage can write into it (a folded conv), saving a copy."""
        gh = self.net.gh
        h = f
        folds = self._fold()["gh"]
        for k, fold in enumerate(folds):
            last = k == len(folds) - 1
            h = fold(h, out=out) if last and out is not None and isinstance(fold, FoldedUpConv) else fold(h)
            if k < len(gh.norms):  # GroupNorm + ReLU in place: no second full-size tensor, and the
                # same arithmetic as the slab path (scale_shift_), so whole == slab bit for bit in bf16
                h = F.relu_(group_norm_(h, gh.norms[k]))
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
            return F.relu_(scale_shift_(y, *stats[k]))
        return torch.tanh_(y)

    def _gh_slabs(
        self,
        f: torch.Tensor,
        budget: int,
        slab_rows: int | None,
        progress: Progress | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """G^H on ``f`` [1, C, ...] slab by slab (module docstring) into ``out`` (a float32 [1, 1, R, R,
        R] on f's device) or a new volume; returns it."""
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
            mean = torch.zeros(1, g, dtype=torch.float64, device=f.device)
            m2 = torch.zeros_like(mean)  # sum of squared deviations from the running mean
            n_k = f_rows * 2 ** (k + 1)
            step = max(1, (rows * n_k) // total_rows)
            count = 0
            for a in range(0, n_k, step):
                y = self._stage(f, k, a, min(n_k, a + step), stats, activate=False)
                # the slab's group statistics as the whole volume's are taken (``group_stats``, in the
                # layout y has), merged by Chan et al.'s pairwise update: no float64 or reshaped copy of
                # the slab (those took about 1.2 s of a 4.5 s 256^3 slab generation, AVX2 EPYC)
                m_b, v_b = group_stats(y, g)
                n_b = y[0].numel() // g
                delta = m_b - mean
                tot = count + n_b
                mean = mean + delta * (n_b / tot)
                m2 = m2 + v_b * n_b + delta.square() * (count * n_b / tot)
                count = tot
                del y
            var = (m2 / count).clamp_min(0)
            stats.append(gn_affine(norm, mean, var))
            if progress:
                progress(k + 1, total_steps, "statistics")
        shape = (1, 1, total_rows, f.shape[3] * 2**n_stages, f.shape[4] * 2**n_stages)
        if out is None:
            out = torch.empty(shape, device=f.device)
        elif tuple(out.shape) != shape or out.dtype != torch.float32 or out.device != f.device:
            raise ValueError(f"out must be a float32 {list(shape)} volume on {f.device}")
        for a in range(0, total_rows, rows):
            b = min(total_rows, a + rows)
            out[:, :, a:b] = self._stage(f, n_stages - 1, a, b, stats)
        if progress:
            progress(total_steps, total_steps, "generate")
        return out

    # ---------------------------------------------------------------- encoding
    def encode(
        self,
        x: torch.Tensor,
        progress: Progress | None = None,
        *,
        steps: int | None = None,
        label: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Volumes [n, 1, R, R, R] in model space -> latents [n, latent] (hierarchical encoder); in
        the model's precision (``set_precision``: bf16 weights and activations, GroupNorm statistics in
        float32/64), latents returned as float32.

        ``steps`` > 0: the encoder's codes are then fitted by that many Adam steps on the L1 between
        the generated volume and ``x`` (``model.latent.fit``; G frozen, in float32); ``label``: the
        class a conditional model generates while fitting.  0: the encoder alone; None: the config's
        ``encode_steps`` (0 unless the model directory says otherwise)."""
        r = self.config.resolution
        if x.ndim != 5 or tuple(x.shape[1:]) != (1, r, r, r):
            raise ValueError(f"volume must have shape [n, 1, {r}, {r}, {r}], got {list(x.shape)}")
        self.need(self.encoder_parts)
        zs = []
        for i in range(x.shape[0]):
            zs.append(self._encode_one(x[i : i + 1].to(self.device, torch.float32)).float().cpu())
            if progress:
                progress(i + 1, x.shape[0], "encode")
        z = torch.cat(zs, 0)
        steps = self.config.encode_steps if steps is None else steps
        if steps:
            from model.latent.fit import fit_latent

            self.need(self.generator_parts)
            z = fit_latent(self._decoder(label), x.to(self.device), z.to(self.device), steps, progress=progress).cpu()
        return z

    def _decoder(self, label: torch.Tensor | int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """G^A then G^H on the whole volume as differentiable modules (what ``generate`` computes, not
        folded), in float32 whatever the model's precision (on the CPU, bf16 autocast made a step 1.9-3x
        slower: its backward): [1, latent] -> [1, 1, R, R, R]."""
        net = self.net
        lab = None if label is None else torch.as_tensor(label, device=self.device).long().reshape(-1)
        net.one_hot(lab, 1, self.device)  # a conditional model needs its label (ValueError before any step)
        return lambda z: net.gh(net.features(z, lab))

    ENCODE_SLABS_PER_CALL = 2  # E^H slabs per convolution call (one volume has R / (R/8) = 8)

    def _encoder_weights(self) -> dict[str, list[tuple[torch.Tensor, torch.Tensor, Any, Any]]]:
        """E^H's and E^G's convolution weights in the encoding dtype, converted once per precision."""
        if self._enc is None or self._enc[0] != self.precision:
            dt = self._dtype

            def conv(c: torch.nn.Conv3d) -> tuple[torch.Tensor, torch.Tensor, Any, Any]:
                return (c.weight.detach().to(dt), c.bias.detach().to(dt), c.stride, c.padding)

            eh, eg = self.net.eh, self.net.eg
            self._enc = (
                self.precision,
                {"eh": [conv(c) for c in eh.convs], "eg": [conv(c) for c in [*eg.convs, eg.out]]},
            )
        return self._enc[1]

    def _lay(self, h: torch.Tensor) -> torch.Tensor:
        """Convolution inputs in the mixed layout on the CPU (``HAGAN.set_mixed_layout``), as they come elsewhere."""
        return mixed_layout(h) if self.device.type == "cpu" else h

    @torch.inference_mode()
    def _encode_one(self, x: torch.Tensor) -> torch.Tensor:
        """One volume [1, 1, R, R, R] -> [1, latent]: E^H on the R/8-slice slabs (each normalised on its
        own, as ``HAGAN.encode_features``), then E^G, with the layers run as generation runs G^A: the
        convolution in the model's dtype on channels-last inputs where the grid is large, then GroupNorm
        (``_gn``) and ReLU in place, so no layer copies its activations into another layout or dtype on
        the way."""
        net, w = self.net, self._encoder_weights()
        eh, eg = net.eh, net.eg
        slabs = to_slabs(x, net.sub_depth).to(self._dtype)  # [n, 1, d, R, R]
        h_all = None  # [1, C, n*d', H', W'], the slabs' features stacked in depth (from_slabs)
        for i in range(0, len(slabs), self.ENCODE_SLABS_PER_CALL):
            h = slabs[i : i + self.ENCODE_SLABS_PER_CALL]
            for (wt, b, stride, pad), norm in zip(w["eh"], eh.norms, strict=True):
                h = F.relu_(_gn(F.conv3d(self._lay(h), wt, b, stride, pad), norm))
            if h_all is None:  # in E^G's input layout, written slab by slab: no concatenation and no
                # two layout copies of the whole feature map (112 ms of a 2.8 s 256^3 encode, AVX2 EPYC)
                c, d, hh, ww = h.shape[1:]
                big = self.device.type == "cpu" and len(slabs) * d * hh * ww >= CL_MIN_VOXELS  # as _lay
                fmt = torch.channels_last_3d if big else torch.contiguous_format
                h_all = torch.empty(1, c, len(slabs) * d, hh, ww, dtype=h.dtype, device=h.device, memory_format=fmt)
            d = h.shape[2]
            for j in range(len(h)):
                h_all[0, :, (i + j) * d : (i + j + 1) * d] = h[j]
        del slabs, h
        h = h_all
        *convs, out = w["eg"]
        for (wt, b, stride, pad), norm in zip(convs, eg.norms, strict=True):
            h = F.relu_(_gn(F.conv3d(self._lay(h), wt, b, stride, pad), norm))
        wt, b, stride, pad = out
        if tuple(h.shape[2:]) == tuple(wt.shape[2:]) and not any(pad):
            # the kernel covers the whole map: one matrix product (oneDNN reordered the 67 MB of
            # weights on every call at the authors' width: 32 against 3 ms, probe_encode_convs.py)
            return torch.addmm(b, h.reshape(h.shape[0], -1), wt.reshape(wt.shape[0], -1).t())
        return F.conv3d(h.contiguous(), wt, b, stride, pad).flatten(1)

    def reconstruct(self, x: torch.Tensor, label: torch.Tensor | int | None = None, **kw: Any) -> torch.Tensor:
        return self.generate(self.encode(x), label, **kw)


def _gn(h: torch.Tensor, norm: torch.nn.GroupNorm) -> torch.Tensor:
    """GroupNorm of a G^A or encoder layer.  In bf16: PyTorch's kernel, which reads a
    channels-last input as it lies and keeps its layout and dtype, statistics and affine in float32 (the
    weights stay float32).  On the 2-core AMX Xeon it took 10.6 ms for [2, 32, 16, 128, 128] where
    ``group_norm_`` (chunked float64 statistics, then a bf16 scale-and-shift pass in place) took 50 ms,
    with the same largest error against float32: 256^3 encoding 0.65 -> 0.54 s (benchmarks/RESULTS.md).
    In float32 the in-place ``group_norm_`` is kept (no second full-size buffer; encoding 1.00 s with
    it, 1.04 s with the kernel's).  G^H keeps ``group_norm_`` too: with the kernel its whole-volume
    path was 0.56 -> 0.47 s at 256^3 in bf16 but no longer equal, bit for bit, to the slab path, whose
    statistics are the whole volume's (``scale_shift_``), so a seed's volume would depend on the memory
    budget."""
    if h.dtype == torch.float32:
        return group_norm_(h, norm)
    return F.group_norm(h, norm.num_groups, norm.weight, norm.bias, norm.eps)


def reference_generate(net: HAGAN, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
    """The plain path, as the authors' code runs it in eval mode: G^A, then G^H with explicit
    upsampling, on the whole feature map.  For tests and benchmarks."""
    return net.gh(net.features(z, label))


def init_cli(a: Any) -> int:
    """voxgen init --family hagan."""
    from model.base import Intensity

    cfg = HAGANConfig(
        resolution=a.resolution,
        latent_dim=a.latent_dim or 1024,
        width=a.width,
        class_names=[c for c in (a.classes or "").split(",") if c],
        modality=a.modality,
        spacing=tuple(a.spacing) if a.spacing else (1.0, 1.0, 1.0),
        intensity=Intensity.for_modality(a.modality),
        description="UNTRAINED: a freshly initialised HA-GAN with random weights; its volumes are not anatomy",
    )
    m = HAGANModel.init(cfg, seed=a.seed)
    m.save_pretrained(a.output)
    print(f"wrote an untrained HA-GAN ({cfg.resolution}^3, latent {cfg.latent_dim}, width {cfg.width}) to {a.output}")
    return 0
