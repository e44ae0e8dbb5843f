"""Exact rewrites of HA-GAN's generator for serving (model/hagan/model.py uses them):

* **Folded upsample + conv.**  A nearest x2 upsample followed by a 3x3x3 conv (padding 1) equals,
  for each of the eight output parities (a, b, c), a 2x2x2 conv on the un-upsampled input.  All
  eight are one conv with 8*Cout output channels on the low-resolution grid (padding 1), followed
  by an interleave: 64 instead of 216 multiply-adds per low-resolution voxel and input channel
  pair (3.4x fewer), and no upsampled tensor is ever made.
* **Transposed convs in G^H.**  G^H stages with several output channels (both paths) run
  the same upsample + conv as one stride-2 transposed conv with derived 4x4x4 weights
  (``TransposedUpConv``): oneDNN writes the interleaved output itself, so the parity copies go; the
  activations are then channels-last.  GroupNorm statistics come from per-channel chunked sums
  (``group_stats``) in any layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.hagan.networks import upconv_weight

_PARITIES = [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)]
# 3 taps of a conv on the upsampled grid -> 2 taps on the original grid, per output parity
_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)


def fold_upconv(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[Co, Ci, 3, 3, 3] conv after a nearest x2 upsample -> [8*Co, Ci, 2, 2, 2] conv (parity-major)."""
    w = weight.detach().double()
    parts = [torch.einsum("pk,ql,rm,oiklm->oipqr", _TAPS[a], _TAPS[b], _TAPS[c], w) for a, b, c in _PARITIES]
    return torch.cat(parts, 0).to(weight.dtype).contiguous(), bias.detach().repeat(8).contiguous()


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


def gn_affine(norm: torch.nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, channel) scale and shift equal to GroupNorm with the given group statistics."""
    g = norm.num_groups
    c = norm.num_channels
    rstd = torch.rsqrt(var + norm.eps)  # [B, G] float64
    scale = rstd.repeat_interleave(c // g, dim=1) * norm.weight.double()
    shift = norm.bias.double() - mean.repeat_interleave(c // g, dim=1) * scale
    return scale.float(), shift.float()


STATS_ROWS = 4096  # voxels per chunk of the GroupNorm statistics (a chunk of 32 channels: 512 KiB)


def group_stats(h: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def group_norm_(h: torch.Tensor, norm: torch.nn.GroupNorm) -> torch.Tensor:
    """GroupNorm of h in place (statistics in float32/64, then one scale-and-shift pass).  The scale
    and shift are cast to h's dtype: a float32 operand would make a bf16 tensor's in-place update
    promote every element (about 3x slower), for no accuracy the bf16 result can keep."""
    return scale_shift_(h, *gn_affine(norm, *group_stats(h, norm.num_groups)))


def scale_shift_(h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """h * scale + shift in place, per (sample, channel), in h's dtype."""
    return h.mul_(scale.to(h.dtype)[:, :, None, None, None]).add_(shift.to(h.dtype)[:, :, None, None, None])


def chunked_sq_sum(yg: torch.Tensor) -> torch.Tensor:
    total = torch.zeros(yg.shape[:2], dtype=torch.float64, device=yg.device)
    for s in range(0, yg.shape[-1], 2**24):
        total += (yg[..., s : s + 2**24].double() ** 2).sum(-1)
    return total
