"""HA-GAN networks (Sun et al., IEEE JBHI 2022).

Seven sub-networks, named as in the paper:

* ``GA`` (G^A, common block): latent -> 16c@4^3 -> ... -> 2c@(R/4)^3 features (2c = 64 at full width).
* ``GL`` (G^L): features -> 1@(R/4)^3 low-resolution volume.
* ``GH`` (G^H): a feature slab -> a high-resolution sub-volume during training, the whole
  feature map -> the whole R^3 volume at inference.
* ``DH`` (D^H): discriminator on a high-resolution sub-volume, told its start position r.
* ``DL`` (D^L): discriminator on the low-resolution whole volume.
* ``EH`` (E^H): high-resolution sub-volume -> feature slab.
* ``EG`` (E^G): whole feature map -> latent.

At full width (``width=1``) and resolution 256 (or 128) the layers, shapes and parameter counts
equal the authors' reference implementation; GroupNorm(8) everywhere in G and E, spectral norm
in D, nearest-neighbour upsampling.  The 512^3 configuration keeps G^A of the 256^3 model
(features at 64^3) and adds one more x2 stage to G^H (64 -> 32 -> 16 -> 1 channels), one more
stride-2 stage in front of D^H and E^H; D^L sees the 64^3 low-resolution volume as at 256^3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.hagan.config import HAGANConfig

# --------------------------------------------------------------------------------------------
# spectral normalisation with the authors' buffer layout (u0: [1, out], sv0: [1])
# --------------------------------------------------------------------------------------------


class _SpectralNorm:
    """One power iteration per forward pass; ``u0`` is updated in training mode only.

    The buffer names and shapes equal the authors' (BigGAN-style) layers so their discriminator
    checkpoints load as they are.
    """

    weight: torch.Tensor
    u0: torch.Tensor
    sv0: torch.Tensor
    training: bool

    def _init_sn(self, num_outputs: int) -> None:
        self.register_buffer("u0", torch.randn(1, num_outputs))  # type: ignore[attr-defined]
        self.register_buffer("sv0", torch.ones(1))  # type: ignore[attr-defined]

    def normalized_weight(self) -> torch.Tensor:
        w = self.weight.reshape(self.weight.shape[0], -1)
        with torch.no_grad():
            v = F.normalize(self.u0 @ w, eps=1e-12)
            u = F.normalize(v @ w.t(), eps=1e-12)
            if self.training:
                self.u0.copy_(u)
        sigma = ((v @ w.t()) @ u.t()).squeeze()
        if self.training:
            with torch.no_grad():
                self.sv0.copy_(sigma.detach().reshape(1))
        return self.weight / sigma


class SNConv3d(nn.Conv3d, _SpectralNorm):
    def __init__(self, *args, **kwargs) -> None:
        nn.Conv3d.__init__(self, *args, **kwargs)
        self._init_sn(self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv3d(x, self.normalized_weight(), self.bias, self.stride, self.padding)


class SNLinear(nn.Linear, _SpectralNorm):
    def __init__(self, *args, **kwargs) -> None:
        nn.Linear.__init__(self, *args, **kwargs)
        self._init_sn(self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.normalized_weight(), self.bias)


def _conv3(cin: int, cout: int) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, kernel_size=3, stride=1, padding=1, bias=True)


def _gn(ch: int, min_group: int = 1) -> nn.GroupNorm:
    """GroupNorm with 8 groups, as the authors; fewer where a reduced-width model has fewer than
    8 * ``min_group`` channels, so each group keeps at least ``min_group`` channels (the authors'
    layers at width 0.25 with ``min_group = 1`` become one channel per group: instance norm)."""
    return nn.GroupNorm(max(1, min(8, ch // max(1, min_group))), ch)


def group_norm_with(h: torch.Tensor, norm: nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``norm(h)`` with given per-(sample, group) statistics [B, G] instead of ``h``'s own (no
    gradient through them): a slab normalised as it is within the whole volume."""
    b, c = h.shape[:2]
    g = norm.num_groups
    shape = (b, g) + (1,) * (h.ndim - 1)  # broadcast over the group's channels and voxels
    hg = h.reshape(b, g, c // g, *h.shape[2:])
    rstd = torch.rsqrt(var.to(h.dtype) + norm.eps).reshape(shape)
    out = ((hg - mean.to(h.dtype).reshape(shape)) * rstd).reshape(h.shape)
    bshape = (1, c) + (1,) * (h.ndim - 2)
    return out * norm.weight.reshape(bshape) + norm.bias.reshape(bshape)


# Memory layout per convolution on the CPU (``HAGAN.set_mixed_layout``): channels-last 3D when the
# input grid has at least this many voxels (16^3), where oneDNN's channels-last kernels are faster;
# the standard layout below it, where the layer is dominated by its weights and channels-last would
# reorder them (and their gradients) on every call.  The end-to-end effect is the "channels_last
# off" row of the ablation in benchmarks/RESULTS.md.
CL_MIN_VOXELS = 4096


class _Layout(nn.Module):
    """A sub-network whose convolution inputs can follow the mixed layout policy."""

    mixed_layout = False

    def lay(self, x: torch.Tensor) -> torch.Tensor:
        return mixed_layout(x) if self.mixed_layout else x


def mixed_layout(x: torch.Tensor) -> torch.Tensor:
    """A convolution input in the mixed layout: channels-last 3D on large grids, standard on small ones."""
    if x.shape[2] * x.shape[3] * x.shape[4] < CL_MIN_VOXELS:
        return x.contiguous()
    if x.shape[1] == 1 and x.stride(1) != 1:
        # one channel: both layouts are the same bytes, but only explicit channels-last strides
        # make the convolution's output channels-last (else the next layer reorders it)
        return torch.empty_like(x, memory_format=torch.channels_last_3d).copy_(x)
    return x.contiguous(memory_format=torch.channels_last_3d)


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


# K[k] = sum_s w[s] * box[k - 2 + s]: the 4 taps of "x2 nearest upsample, then a 3-tap conv" as one
# stride-2 transposed conv (box = the upsample's [1, 1] footprint).
_UPCONV_TAPS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def upconv_weight(weight: torch.Tensor) -> torch.Tensor:
    """[Co, Ci, 3, 3, 3] conv weights -> [Ci, Co, 4, 4, 4] stride-2 transposed-conv weights (differentiable)."""
    t = _UPCONV_TAPS.to(weight)
    return torch.einsum("ka,lb,mc,oiabc->ioklm", t, t, t, weight)


FUSE_MIN_VOXELS = 512  # 8^3


def up_conv(x: torch.Tensor, conv: nn.Conv3d, fused: bool = True) -> torch.Tensor:
    """``conv(upsample_nearest_x2(x))`` with padding 1.

    ``fused`` computes it as one stride-2 transposed convolution on the input grid (exact: the
    same sums, padding included, in a different order): 64 instead of 216 multiply-adds per input
    voxel and channel pair, and backward saves x instead of the 8x larger upsampled tensor.  About 3x
    faster forward + backward on the CPU for HA-GAN's layers.  The weights stay 3x3x3 convs, so
    checkpoints do not change.  Inputs on grids below ``FUSE_MIN_VOXELS`` (G^A's first stage, 4^3)
    take the literal path even when ``fused``: there the 2.4x larger derived weights (64 MiB at
    512 -> 512 channels) and their gradient cost more than the multiply-adds saved."""
    if not fused or x.shape[2] * x.shape[3] * x.shape[4] < FUSE_MIN_VOXELS:
        return conv(_up(x))
    return F.conv_transpose3d(x, upconv_weight(conv.weight), conv.bias, stride=2, padding=1)


# --------------------------------------------------------------------------------------------
# widths
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Widths:
    """Channel widths derived from the config (c = 32 at width 1)."""

    c: int

    @classmethod
    def of(cls, cfg: HAGANConfig) -> Widths:
        c = int(round(32 * cfg.width))
        if c < 8 or c % 8:
            raise ValueError(f"width {cfg.width} gives {c} base channels; it must be a multiple of 8 (>= 8)")
        return cls(c)


# --------------------------------------------------------------------------------------------
# generator
# --------------------------------------------------------------------------------------------


class GA(_Layout):
    """Common block: latent (+ one-hot class) -> 2c @ (R/4)^3 features."""

    fused_upconv = True  # see up_conv; False runs the authors' literal upsample + conv

    def __init__(self, cfg: HAGANConfig) -> None:
        super().__init__()
        c = Widths.of(cfg).c
        self.c0 = 16 * c
        self.fc = nn.Linear(cfg.latent_dim + cfg.num_classes, 4 * 4 * 4 * 16 * c)
        chans = [16 * c, 16 * c, 16 * c, 8 * c, 4 * c, 2 * c]
        self.convs = nn.ModuleList(_conv3(chans[i], chans[i + 1]) for i in range(5))
        self.norms = nn.ModuleList(_gn(chans[i + 1], cfg.norm_min_group) for i in range(5))
        # which convs are preceded by a x2 nearest upsample (the 128^3 model stops at 32^3)
        n_up = 3 if cfg.resolution == 128 else 4
        self.upsample_before = [False] + [True] * n_up + [False] * (4 - n_up)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(z.shape[0], self.c0, 4, 4, 4)
        for conv, norm, up in zip(self.convs, self.norms, self.upsample_before, strict=True):
            h = self.lay(h)
            h = up_conv(h, conv, self.fused_upconv) if up else conv(h)
            h = F.relu(norm(h), inplace=True)
        return h


class GL(_Layout):
    """Low-resolution branch: features -> 1 @ (R/4)^3 (no upsampling)."""

    def __init__(self, cfg: HAGANConfig) -> None:
        super().__init__()
        c = Widths.of(cfg).c
        chans = [2 * c, c, c // 2, 1]
        self.convs = nn.ModuleList(_conv3(chans[i], chans[i + 1]) for i in range(3))
        self.norms = nn.ModuleList(_gn(chans[i + 1], cfg.norm_min_group) for i in range(2))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            h = conv(self.lay(h))
            h = F.relu(self.norms[i](h), inplace=True) if i < len(self.norms) else torch.tanh(h)
        return h


class GH(_Layout):
    """High-resolution branch: x2 nearest upsample + 3x3x3 conv stages, then tanh."""

    fused_upconv = True  # see up_conv

    def __init__(self, cfg: HAGANConfig) -> None:
        super().__init__()
        c = Widths.of(cfg).c
        h = round(32 * cfg.gh_width) if cfg.gh_width else c  # hidden channels (config.gh_width)
        chans = [2 * c, h, 1] if cfg.resolution in (128, 256) else [2 * c, h, h // 2, 1]
        self.convs = nn.ModuleList(_conv3(chans[i], chans[i + 1]) for i in range(len(chans) - 1))
        self.norms = nn.ModuleList(_gn(chans[i + 1], cfg.norm_min_group) for i in range(len(chans) - 2))

    @property
    def scale(self) -> int:
        return 2 ** len(self.convs)

    def forward(self, h: torch.Tensor, stats: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """``stats``: GroupNorm statistics per norm layer (``group_stats`` of the whole feature map),
        so a training slab is normalised as the whole volume is at inference; None: its own."""
        for i, conv in enumerate(self.convs):
            h = up_conv(self.lay(h), conv, self.fused_upconv)
            if i < len(self.norms):
                h = self.norms[i](h) if stats is None else group_norm_with(h, self.norms[i], *stats[i])
                h = F.relu(h, inplace=True)
            else:
                h = torch.tanh(h)
        return h

    @torch.no_grad()
    def group_stats(self, h: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-(sample, group) mean and variance [B, G] of every GroupNorm input when G^H runs on
        the whole feature map ``h`` (what inference normalises with); no gradient."""
        out = []
        for i, norm in enumerate(self.norms):
            h = up_conv(self.lay(h), self.convs[i], self.fused_upconv)
            g = h.float().reshape(h.shape[0], norm.num_groups, -1)
            mean, var = g.mean(-1), g.var(-1, unbiased=False)
            out.append((mean, var))
            h = F.relu(group_norm_with(h, norm, mean, var))
        return out


def code_gaussian(codes: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Gaussian of latent codes [m, k]: their mean, and S^(1/2) and S^(-1/2) of their covariance
    S = V diag(lam) V^T (symmetric), its eigenvalues floored at ``floor`` times their mean (m codes span
    at most m - 1 of the k dimensions); returns (mean, root, inverse root, lam), in float64."""
    c = codes.double()
    mean = c.mean(0)
    k = len(mean)
    cov = torch.cov(c.T) if len(c) > 1 else torch.eye(k, dtype=c.dtype, device=c.device)
    lam, vec = torch.linalg.eigh(cov)
    lam = lam.clamp_min(floor * float(lam.clamp_min(0).mean()) + 1e-12)
    return mean, (vec * lam.sqrt()) @ vec.T, (vec / lam.sqrt()) @ vec.T, lam


@torch.no_grad()
def fold_code_gaussian(fc: nn.Linear, mean: torch.Tensor, root: torch.Tensor) -> None:
    """G^A's first layer ``fc`` (h = W [c, onehot] + b) made to take z where it took the code
    c = mean + root z, in place: a z ~ N(0, I) then stands for a code drawn from that Gaussian."""
    k = len(mean)
    wl = fc.weight[:, :k].double()
    fc.bias.add_((wl @ mean).to(fc.bias.dtype))
    fc.weight[:, :k] = (wl @ root).to(fc.weight.dtype)


def widen_gh_state(
    state: dict[str, torch.Tensor], hidden: int, min_group: int, noise: float = 0.01, seed: int = 0
) -> dict[str, torch.Tensor]:
    """``state`` (a HAGAN state dict) with G^H's hidden layers widened to ``hidden`` channels (the last
    hidden layer of a 512^3 G^H to ``hidden // 2``) by duplicating channels, so the widened G^H draws
    what the narrow one drew (net2net): each new channel copies an old channel of the same GroupNorm
    group, so every group holds each of its old channels equally often and keeps its mean and variance,
    and the next layer's input weights are divided by the number of copies.  ``noise`` (a fraction of
    each layer's weight standard deviation) is added to the copies' input weights so they can grow
    apart in training (0: the function exactly).  Raises ValueError where the widened layer's
    GroupNorm would have another number of groups (the copy could not keep the statistics)."""
    out = dict(state)
    k = 0
    gen = torch.Generator().manual_seed(seed)
    while f"gh.norms.{k}.weight" in state:
        old = state[f"gh.norms.{k}.weight"].shape[0]
        new = hidden if k == 0 else hidden // 2**k
        if new == old:
            k += 1
            continue
        groups = _gn(old, min_group).num_groups
        if new < old or new % old or _gn(new, min_group).num_groups != groups:
            raise ValueError(
                f"G^H's hidden layer {k} cannot be widened from {old} to {new} channels by copying "
                f"(a multiple of {old} with {groups} GroupNorm groups is needed)"
            )
        per_old, per_new = old // groups, new // groups
        src = torch.tensor([(i // per_new) * per_old + (i % per_new) % per_old for i in range(new)])
        copies = new // old
        w = state[f"gh.convs.{k}.weight"][src].clone()
        if noise > 0:
            w += noise * float(w.float().std()) * torch.randn(w.shape, generator=gen).to(w.dtype)
        out[f"gh.convs.{k}.weight"] = w
        out[f"gh.convs.{k}.bias"] = state[f"gh.convs.{k}.bias"][src].clone()
        out[f"gh.norms.{k}.weight"] = state[f"gh.norms.{k}.weight"][src].clone()
        out[f"gh.norms.{k}.bias"] = state[f"gh.norms.{k}.bias"][src].clone()
        nxt = f"gh.convs.{k + 1}.weight"
        out[nxt] = out[nxt][:, src] / copies  # (a widened next layer: its outputs were copied already)
        state = out
        k += 1
    return out


# --------------------------------------------------------------------------------------------
# discriminators
# --------------------------------------------------------------------------------------------


class DH(_Layout):
    """High-resolution discriminator: sub-volume (R/8 x R x R) and its start r -> logit(s)."""

    def __init__(self, cfg: HAGANConfig) -> None:
        super().__init__()
        c = Widths.of(cfg).c
        n = cfg.num_classes
        specs: list[tuple[int, int, tuple, tuple, tuple]] = []
        if cfg.resolution == 512:
            specs.append((1, c // 4, (4, 4, 4), (2, 2, 2), (1, 1, 1)))
        if cfg.resolution >= 256:
            specs.append((specs[-1][1] if specs else 1, c // 2, (4, 4, 4), (2, 2, 2), (1, 1, 1)))
        first_in = specs[-1][1] if specs else 1
        specs += [
            (first_in, c, (4, 4, 4), (2, 2, 2), (1, 1, 1)),
            (c, 2 * c, (4, 4, 4), (2, 2, 2), (1, 1, 1)),
            (2 * c, 4 * c, (2, 4, 4), (2, 2, 2), (0, 1, 1)),
            (4 * c, 8 * c, (2, 4, 4), (2, 2, 2), (0, 1, 1)),
            (8 * c, 16 * c, (1, 4, 4), (1, 2, 2), (0, 1, 1)),
            (16 * c, 4 * c, (1, 4, 4), (1, 1, 1), (0, 0, 0)),
        ]
        self.convs = nn.ModuleList(SNConv3d(i, o, kernel_size=k, stride=s, padding=p) for i, o, k, s, p in specs)
        self.fc1 = SNLinear(4 * c + 1, 2 * c)
        self.fc2 = SNLinear(2 * c, 1)
        self.fc_class = SNLinear(2 * c, n) if n > 0 else None
        self.r_scale = float(cfg.resolution - cfg.resolution // 8)  # 224 at 256^3, 112 at 128^3

    def forward(self, x: torch.Tensor, r: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = x
        for conv in self.convs:
            h = F.leaky_relu(conv(self.lay(h)), 0.2, inplace=True)
        h = h.flatten(1)  # batch of one works (the authors' squeeze() does not)
        pos = torch.as_tensor(r, dtype=h.dtype, device=h.device).reshape(-1, 1) / self.r_scale
        h = torch.cat([h, pos.expand(h.shape[0], 1)], dim=1)
        h = F.leaky_relu(self.fc1(h), 0.2)
        return self.fc2(h), (self.fc_class(h) if self.fc_class is not None else None)


class DL(_Layout):
    """Low-resolution discriminator on the whole (R/4)^3 (64^3 at 512^3) volume."""

    def __init__(self, cfg: HAGANConfig) -> None:
        super().__init__()
        c = Widths.of(cfg).c
        self.num_classes = cfg.num_classes
        chans = [1, c, 2 * c, 4 * c, 8 * c] if cfg.resolution != 128 else [1, 2 * c, 4 * c, 8 * c]
        self.convs = nn.ModuleList(
            SNConv3d(chans[i], chans[i + 1], kernel_size=4, stride=2, padding=1) for i in range(len(chans) - 1)
        )
        self.out = SNConv3d(8 * c, 1 + cfg.num_classes, kernel_size=4, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = x
        for conv in self.convs:
            h = F.leaky_relu(conv(self.lay(h)), 0.2, inplace=True)
        h = self.out(self.lay(h)).flatten(1)
        return h[:, :1], (h[:, 1:] if self.num_classes > 0 else None)


# --------------------------------------------------------------------------------------------
# encoders
# --------------------------------------------------------------------------------------------


class EH(_Layout):
    """Sub-volume encoder: 1 @ (R/8 x R x R) -> 2c @ (R/32 x R/4 x R/4), a slab of the feature map."""

    def __init__(self, cfg: HAGANConfig) -> None:
        super().__init__()
        c = Widths.of(cfg).c
        specs = []
        if cfg.resolution == 512:
            specs.append((1, c // 2, 4, 2, 1))
        specs += [(specs[-1][1] if specs else 1, c, 4, 2, 1), (c, c, 3, 1, 1), (c, 2 * c, 4, 2, 1)]
        self.convs = nn.ModuleList(nn.Conv3d(i, o, kernel_size=k, stride=s, padding=p) for i, o, k, s, p in specs)
        self.norms = nn.ModuleList(_gn(o, cfg.norm_min_group) for _, o, *_ in specs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for conv, norm in zip(self.convs, self.norms, strict=True):
            h = F.relu(norm(conv(self.lay(h))), inplace=True)
        return h


class EG(_Layout):
    """Global encoder: the whole feature map 2c @ (R/4)^3 -> latent."""

    def __init__(self, cfg: HAGANConfig) -> None:
        super().__init__()
        c = Widths.of(cfg).c
        chans = [2 * c, c, 2 * c, 4 * c, 8 * c] if cfg.resolution != 128 else [2 * c, 2 * c, 4 * c, 8 * c]
        self.convs = nn.ModuleList(
            nn.Conv3d(chans[i], chans[i + 1], kernel_size=4, stride=2, padding=1) for i in range(len(chans) - 1)
        )
        self.norms = nn.ModuleList(_gn(chans[i + 1], cfg.norm_min_group) for i in range(len(chans) - 1))
        self.out = nn.Conv3d(8 * c, cfg.latent_dim, kernel_size=4, stride=1, padding=0)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms, strict=True):
            h = F.relu(norm(conv(self.lay(h))), inplace=True)
        return self.out(self.lay(h)).flatten(1)


# --------------------------------------------------------------------------------------------
# the whole model
# --------------------------------------------------------------------------------------------


class HAGAN(nn.Module):
    """All seven sub-networks of one HA-GAN model."""

    def __init__(self, cfg: HAGANConfig) -> None:
        super().__init__()
        self.config = cfg
        self.ga = GA(cfg)
        self.gl = GL(cfg)
        self.gh = GH(cfg)
        self.dh = DH(cfg)
        self.dl = DL(cfg)
        self.eh = EH(cfg)
        self.eg = EG(cfg)

    def set_fused_upconv(self, fused: bool) -> HAGAN:
        """Fused (default) or literal upsample + conv in G^A and G^H; the same function either way."""
        self.ga.fused_upconv = self.gh.fused_upconv = bool(fused)
        return self

    def set_mixed_layout(self, on: bool) -> HAGAN:
        """Convolution inputs channels-last 3D on large grids, standard on small ones (``CL_MIN_VOXELS``).

        Parameters stay in the standard layout.  The values are the same up to float summation order."""
        for m in self.modules():
            if isinstance(m, _Layout):
                m.mixed_layout = bool(on)
        return self

    # groups of sub-networks as the paper and the authors' checkpoints group them
    GROUPS = {"G": ("ga", "gl", "gh"), "D": ("dh", "dl"), "E^H": ("eh",), "E^G": ("eg",)}

    @property
    def sub_depth(self) -> int:
        """Depth (slices) of a high-resolution training sub-volume: R/8."""
        return self.config.resolution // 8

    @property
    def feat_scale(self) -> int:
        """Ratio between the output grid and the G^A feature grid (4 at 128/256, 8 at 512)."""
        return self.gh.scale

    def one_hot(self, label: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor | None:
        k = self.config.num_classes
        if k == 0:
            if label is not None:
                raise ValueError("this model is not class-conditional; do not pass a label")
            return None
        if label is None:
            raise ValueError(f"this model is class-conditional: pass a label in 0..{k - 1}")
        label = torch.as_tensor(label, device=device).long().reshape(-1).expand(n)
        if int(label.min()) < 0 or int(label.max()) >= k:
            raise ValueError(f"label must be in 0..{k - 1}")
        return F.one_hot(label, k).float()

    def latent_input(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        onehot = self.one_hot(label, z.shape[0], z.device)
        return z if onehot is None else torch.cat([z, onehot.to(z.dtype)], dim=1)

    def features(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        return self.ga(self.latent_input(z, label))

    def generate_train(
        self, z: torch.Tensor, r: int, label: torch.Tensor | None = None, whole_stats: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training forward: (high-res sub-volume of ``sub_depth`` slices starting at slice r, low-res
        whole volume).  A start r that is not a multiple of the feature scale takes one more feature
        slice and crops G^H's output to the sub-volume.  ``whole_stats``: G^H's GroupNorm uses the
        statistics of the whole feature map (as inference does) instead of the slab's own."""
        crops, low = self.generate_train_crops(z, [r], label, whole_stats)
        return crops[0], low

    def generate_train_crops(
        self, z: torch.Tensor, rs: list[int], label: torch.Tensor | None = None, whole_stats: bool = False
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``generate_train`` at several starts ``rs`` from one feature map: ([the sub-volume at each
        start], the low-resolution whole volume)."""
        f = self.features(z, label)
        s, d = self.feat_scale, self.sub_depth
        for r in rs:
            if not 0 <= r <= self.config.resolution - d:
                raise ValueError(f"r={r} must be in 0..{self.config.resolution - d}")
        stats = self.gh.group_stats(f) if whole_stats else None
        crops = []
        for r in rs:
            lo, hi = r // s, -(-(r + d) // s)
            out = self.gh(f[:, :, lo:hi], stats)
            off = r - lo * s
            if off or out.shape[2] != d:
                out = out[:, :, off : off + d]
            crops.append(out)
        return crops, self.gl(f)

    def discriminate(
        self, x_high: torch.Tensor, x_low: torch.Tensor, r: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """D(x) as the authors define it: the mean of D^H and D^L logits (and class logits)."""
        h_logit, h_cls = self.dh(x_high, r)
        l_logit, l_cls = self.dl(x_low)
        cls = None if h_cls is None else (h_cls + l_cls) / 2.0
        return (h_logit + l_logit) / 2.0, cls

    def encode_features(
        self, x: torch.Tensor, slabs_per_call: int | None = None, channels_last: bool | None = None
    ) -> torch.Tensor:
        """E^H on the non-overlapping partition of depth into R/8-slice slabs, concatenated.

        The slabs of all volumes run through E^H as one batch (``slabs_per_call`` at a time, all
        by default; each slab is normalised on its own, so the batching does not change the
        result), in channels-last 3D layout on the CPU (``channels_last=None``), where the CPU
        convolutions are 25-30% faster for these layers; the values are the same up to float
        summation order."""
        b = x.shape[0]
        slabs = to_slabs(x, self.sub_depth)  # [b*n, C, d, H, W]
        if self.eh.mixed_layout:
            pass  # E^H lays out its own inputs (set_mixed_layout)
        elif channels_last if channels_last is not None else x.device.type == "cpu":
            slabs = slabs.contiguous(memory_format=torch.channels_last_3d)
        k = max(1, slabs_per_call or len(slabs))
        return from_slabs(torch.cat([self.eh(slabs[i : i + k]) for i in range(0, len(slabs), k)]), b)


def to_slabs(x: torch.Tensor, d: int) -> torch.Tensor:
    """[b, C, D, H, W] -> the non-overlapping partition of depth into d-slice slabs, [b*n, C, d, H, W]
    (volume-major: the n slabs of the first volume first)."""
    depth = x.shape[2]
    if depth % d:
        raise ValueError(f"depth {depth} is not a multiple of the sub-volume depth {d}")
    return x.unflatten(2, (depth // d, d)).transpose(1, 2).flatten(0, 1)


def from_slabs(f: torch.Tensor, b: int) -> torch.Tensor:
    """The inverse of ``to_slabs`` for per-slab features: [b*n, C', d', H', W'] -> [b, C', n*d', H', W'],
    slab i at depths i*d' .., contiguous."""
    return f.unflatten(0, (b, len(f) // b)).transpose(1, 2).flatten(2, 3).contiguous()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(net: HAGAN) -> dict[str, int]:
    """Per sub-network and per group (G, D, E^H, E^G), and ``total_parameters``."""
    out: dict[str, int] = {}
    for name in ("ga", "gl", "gh", "dh", "dl", "eh", "eg"):
        out[name] = count_parameters(getattr(net, name))
    for group, names in HAGAN.GROUPS.items():
        out[group] = sum(out[n] for n in names)
    out["total_parameters"] = count_parameters(net)
    return out
