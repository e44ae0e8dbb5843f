"""Layers of the style-based networks, written once for 2D and 3D (``dims``).

The StyleGAN2 conventions (Karras et al. 2020), re-implemented here:

* **Equalised learning rate.**  Weights are stored as N(0, 1) / lr_mult and scaled at run time by
  ``lr_mult / sqrt(fan_in)``; biases are scaled by ``lr_mult``.
* **Modulated convolution.**  ``w'[o, i, k] = s[i] * w[o, i, k]`` (eq. 1 of Liu et al.), demodulated
  ``w''[o, i, k] = w'[o, i, k] / sqrt(sum_{i,k} w'[o, i, k]^2 + eps)`` (eq. 2), computed for the
  whole batch as one grouped convolution.
* Leaky ReLU (0.2) after the bias, scaled by sqrt(2); noise ``strength * n`` added per voxel.
* Resampling: linear x2 upsampling (the [1, 3, 3, 1] filter of StyleGAN2, replicated edges) and
  2x2(x2) average pooling for the discriminator's downsampling.

Channel Split&Shuffle (Liu et al. 2022, Fig. 3):

* Generator: the channels are split in two halves, each half goes through its own modulated
  convolution (own affine style, noise strength and bias), the halves are concatenated and
  shuffled with two groups: output channel ``j`` of half ``h`` lands at position ``2 j + h``.
* Discriminator: the first ``ceil(Cin/2)`` input channels go through a 3x3(x3) conv, the rest
  through a 1x1(x1) conv, each to ``Cout/2`` channels; concatenated, shuffled the same way.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model import distributed

LRELU_GAIN = math.sqrt(2.0)


def conv_nd(dims: int):
    return F.conv3d if dims == 3 else F.conv2d


def lrelu(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    return F.leaky_relu(x, 0.2) * (LRELU_GAIN * gain)


def add_bias(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return x + b.reshape(1, -1, *([1] * (x.ndim - 2)))


def _upsample2x_axis(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Linear x2 along one axis (half-pixel centres, replicated edges): out[2i] = x[i-1]/4 + 3x[i]/4,
    out[2i+1] = 3x[i]/4 + x[i+1]/4."""
    n = x.shape[dim]
    prev = torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, n - 1)], dim)
    nxt = torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 1, 1)], dim)
    out = torch.stack([0.25 * prev + 0.75 * x, 0.75 * x + 0.25 * nxt], dim + 1)
    shape = list(x.shape)
    shape[dim] = 2 * n
    return out.reshape(shape)


def upsample2x_explicit(x: torch.Tensor) -> torch.Tensor:
    """``upsample2x`` written with slices and sums only: its backward has no atomic adds, so it is
    deterministic on CUDA (F.interpolate's trilinear backward is not)."""
    for d in range(2, x.ndim):
        x = _upsample2x_axis(x, d)
    return x


def downsample2x_explicit(x: torch.Tensor) -> torch.Tensor:
    """2x average pooling as a reshape and a mean (deterministic backward on CUDA, unlike avg_pool3d)."""
    b, c, *s = x.shape
    y = x.reshape(b, c, *[v for n in s for v in (n // 2, 2)])
    return y.mean(dim=tuple(range(3, y.ndim, 2)))


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Linear x2 upsampling (StyleGAN2's [1, 3, 3, 1] filter with replicated edges) of 2D or 3D maps.
    On CUDA the explicit form (same values) keeps training bit-reproducible."""
    if x.is_cuda:
        return upsample2x_explicit(x)
    mode = "trilinear" if x.ndim == 5 else "bilinear"
    return F.interpolate(x, scale_factor=2, mode=mode, align_corners=False)


def downsample2x(x: torch.Tensor) -> torch.Tensor:
    """2x average pooling (the explicit form on CUDA, for a deterministic backward)."""
    if x.is_cuda:
        return downsample2x_explicit(x)
    return F.avg_pool3d(x, 2) if x.ndim == 5 else F.avg_pool2d(x, 2)


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """[B, g*m, ...] -> [B, m*g, ...]: channel ``j`` of group ``h`` goes to position ``j * groups + h``."""
    b, c = x.shape[:2]
    rest = x.shape[2:]
    return x.reshape(b, groups, c // groups, *rest).transpose(1, 2).reshape(b, c, *rest)


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


# --------------------------------------------------------------------------------------------
# equalised-lr linear and conv
# --------------------------------------------------------------------------------------------
class EqualLinear(nn.Module):
    def __init__(
        self, in_features: int, out_features: int, *, bias_init: float = 0.0, lr_mult: float = 1.0, act: bool = False
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mult)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init)))
        self.weight_gain = lr_mult / math.sqrt(in_features)
        self.bias_gain = lr_mult
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.bias_gain)
        return lrelu(x) if self.act else x


class EqualConv(nn.Module):
    """Conv with equalised lr, optional bias, leaky ReLU, and 2x average-pool downsampling."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        *,
        dims: int = 3,
        bias: bool = True,
        act: bool = True,
        down: bool = False,
        groups: int = 1,
        gain: float = 1.0,
    ) -> None:
        super().__init__()
        self.dims, self.groups, self.down, self.act, self.gain = dims, groups, down, act, gain
        self.padding = kernel // 2
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels // groups, *([kernel] * dims)))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels // groups * kernel**dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = conv_nd(self.dims)(x, self.weight * self.weight_gain, padding=self.padding, groups=self.groups)
        if self.down:
            x = downsample2x(x)
        if self.bias is not None:
            x = add_bias(x, self.bias)
        return lrelu(x, self.gain) if self.act else x * self.gain


# --------------------------------------------------------------------------------------------
# generator layers
# --------------------------------------------------------------------------------------------
def modulated_conv(
    x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, *, demodulate: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """x [B, Ci, *S], weight [Co, Ci, *K], styles [B, Ci] -> [B, Co, *S] (same padding).

    Each sample gets its own weight ``s_i * w`` (demodulated per output channel); all samples
    run as one grouped convolution.
    """
    b, ci = x.shape[:2]
    co = weight.shape[0]
    k = weight.shape[2:]
    w = weight.unsqueeze(0) * styles.reshape(b, 1, ci, *([1] * len(k)))  # [B, Co, Ci, *K]
    if demodulate:
        d = (w.square().sum(dim=tuple(range(2, w.ndim)), keepdim=True) + eps).rsqrt()
        w = w * d
    y = conv_nd(len(k))(x.reshape(1, b * ci, *x.shape[2:]), w.reshape(b * co, ci, *k), padding=k[0] // 2, groups=b)
    return y.reshape(b, co, *y.shape[2:])


class SynthesisLayer(nn.Module):
    """Affine style, (upsample), modulated/demodulated conv, noise, bias, leaky ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        res: tuple[int, ...],
        *,
        up: bool = False,
        kernel: int = 3,
    ) -> None:
        super().__init__()
        dims = len(res)
        self.up = up
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *([kernel] * dims)))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("noise_const", torch.randn(res))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        styles = self.affine(w)
        if self.up:
            x = upsample2x(x)
        x = modulated_conv(x, self.weight, styles)
        if noise_mode == "random":
            # drawn for the whole batch when it is split over ranks (model/distributed.py)
            noise = distributed.randn_rows(x.shape[0], (1, *x.shape[2:]), device=x.device, dtype=x.dtype)
            x = x + noise * self.noise_strength
        elif noise_mode == "const":
            x = x + self.noise_const * self.noise_strength
        elif noise_mode != "none":
            raise ValueError(f"noise_mode must be 'random', 'const' or 'none', got {noise_mode!r}")
        return lrelu(add_bias(x, self.bias))


class SplitSynthesisLayer(nn.Module):
    """Channel Split(&Shuffle) in G: two half-width SynthesisLayers, concatenated, shuffled."""

    def __init__(
        self, in_channels: int, out_channels: int, w_dim: int, res: tuple[int, ...], *, up: bool = False, shuffle: bool
    ) -> None:
        super().__init__()
        self.shuffle = shuffle
        self.half_in = in_channels // 2
        self.branches = nn.ModuleList(
            [SynthesisLayer(in_channels // 2, out_channels // 2, w_dim, res, up=up) for _ in range(2)]
        )

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        a, b = x[:, : self.half_in], x[:, self.half_in :]
        y = torch.cat([self.branches[0](a, w, noise_mode), self.branches[1](b, w, noise_mode)], 1)
        return channel_shuffle(y, 2) if self.shuffle else y


class ToRGB(nn.Module):
    """1x1 modulated conv without demodulation, + bias: features -> one intensity channel."""

    def __init__(self, in_channels: int, w_dim: int, dims: int, out_channels: int = 1) -> None:
        super().__init__()
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *([1] * dims)))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1.0 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        return add_bias(modulated_conv(x, self.weight, styles, demodulate=False), self.bias)


# --------------------------------------------------------------------------------------------
# discriminator layers
# --------------------------------------------------------------------------------------------
class SplitConv(nn.Module):
    """Channel Split(&Shuffle) in D: ceil(Cin/2) channels -> 3x3(x3) conv, the rest -> 1x1(x1) conv."""

    def __init__(
        self, in_channels: int, out_channels: int, *, dims: int, shuffle: bool, down: bool = False, gain: float = 1.0
    ) -> None:
        super().__init__()
        self.shuffle = shuffle
        self.split = (in_channels + 1) // 2
        half = out_channels // 2
        self.conv3 = EqualConv(self.split, half, 3, dims=dims, down=down, act=False)
        self.conv1 = EqualConv(in_channels - self.split, out_channels - half, 1, dims=dims, down=down, act=False)
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.conv3(x[:, : self.split]), self.conv1(x[:, self.split :])], 1)
        if self.shuffle:
            y = channel_shuffle(y, 2)
        return lrelu(y, self.gain)


class DepthwiseSeparableConv(nn.Module):
    """Depthwise 3x3(x3) conv (no bias) followed by a pointwise 1x1(x1) conv with bias."""

    def __init__(
        self, in_channels: int, out_channels: int, *, dims: int, down: bool = False, gain: float = 1.0
    ) -> None:
        super().__init__()
        self.depthwise = EqualConv(in_channels, in_channels, 3, dims=dims, groups=in_channels, bias=False, act=False)
        self.pointwise = EqualConv(in_channels, out_channels, 1, dims=dims, down=down, gain=gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def d_conv(
    variant: str,
    in_channels: int,
    out_channels: int,
    *,
    dims: int,
    groups: int = 4,
    down: bool = False,
    gain: float = 1.0,
) -> nn.Module:
    """The discriminator's 3x3(x3) conv for one of the paper's D variants."""
    if variant == "baseline":
        return EqualConv(in_channels, out_channels, 3, dims=dims, down=down, gain=gain)
    if variant in ("split-shuffle", "split"):
        return SplitConv(in_channels, out_channels, dims=dims, shuffle=variant == "split-shuffle", down=down, gain=gain)
    if variant == "group":
        g = groups if in_channels % groups == 0 and out_channels % groups == 0 else 1
        return EqualConv(in_channels, out_channels, 3, dims=dims, down=down, groups=g, gain=gain)
    if variant == "depthwise":
        return DepthwiseSeparableConv(in_channels, out_channels, dims=dims, down=down, gain=gain)
    raise ValueError(f"unknown D variant {variant!r}")


class MinibatchStd(nn.Module):
    """Appends one channel: the std over groups of samples, averaged over channels and space.  In a
    data-parallel run the groups are the global batch's, gathered from every rank (differentiably)."""

    def __init__(self, group_size: int = 4) -> None:
        super().__init__()
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = x
        x, lo, hi = distributed.gather_rows(x)  # x itself, 0, n in one process
        n = x.shape[0]
        g = min(self.group_size, n)
        while n % g:
            g -= 1
        rest = x.shape[1:]
        y = x.reshape(g, n // g, *rest)
        y = (y - y.mean(0)).square().mean(0).add(1e-8).sqrt()  # [n/g, C, *S]
        y = y.mean(dim=tuple(range(1, y.ndim)))  # [n/g]
        y = y.reshape(1, n // g, *([1] * len(rest))).expand(g, n // g, 1, *rest[1:]).reshape(n, 1, *rest[1:])
        return torch.cat([local, y if hi - lo == n else y[lo:hi]], 1)  # (no slice op: the same backward sums)


def prod(s: tuple[int, ...]) -> int:
    return int(np.prod(s))
