"""Exact rewrites of HA-GAN's generator for serving (model/hagan/model.py uses them):

* **Folded upsample + conv.**  A nearest x2 upsample followed by a 3x3x3 conv (padding 1) equals,
  for each of the eight output parities (a, b, c), a 2x2x2 conv on the un-upsampled input.  All
  eight are one conv with 8*Cout output channels on the low-resolution grid (padding 1), followed
  by an interleave: 64 instead of 216 multiply-adds per low-resolution voxel and input channel
  pair (3.4x fewer), and no upsampled tensor is ever made.
* **Transposed convs.**  G^H stages with several output channels (both paths), and in float32
  G^A's upsample-convs on inputs of 8^3 and more, run the same upsample + conv as one stride-2
  transposed conv with derived 4x4x4 weights (``TransposedUpConv``): oneDNN writes the interleaved
  output itself, so the parity copies go; the activations are then channels-last.  GroupNorm
  statistics come from per-channel sums (``group_stats``) in any layout.
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

    def __call__(self, x: torch.Tensor, chunk_bytes: int = 64 * 2**20, out: torch.Tensor | None = None) -> torch.Tensor:
        """Runs in depth chunks of the input so the 8-parity intermediate stays small.  ``out``: a
        contiguous [B, Co, 2D, 2H, 2W] tensor of x's dtype to write into (else a new one)."""
        bsz, cin, d, h, w = x.shape
        co = self.cout
        if out is None:
            out = x.new_empty(bsz, co, d, 2, h, 2, w, 2)
        elif tuple(out.shape) != (bsz, co, 2 * d, 2 * h, 2 * w) or out.dtype != x.dtype or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {x.dtype} [{bsz}, {co}, {2 * d}, {2 * h}, {2 * w}] tensor")
        else:
            out = out.view(bsz, co, d, 2, h, 2, w, 2)
        row_bytes = x.element_size() * bsz * (8 * co * (h + 1) * (w + 1) + 2 * cin * h * w)
        rows = max(1, min(d, chunk_bytes // max(1, row_bytes)))
        # equal chunks: a short last one (2 rows of 128) took oneDNN's slow reference path (47 ms)
        rows = -(-d // -(-d // rows))
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
        # channels-last weights, as the activations: else the conv reorders them on every call (13 ms
        # of 119 for G^A's 8^3 -> 16^3 stage at the authors' width, 2-core AVX2 EPYC; same values)
        w = upconv_weight(conv.weight.detach().double()).to(dtype)
        self.weight = w.contiguous(memory_format=torch.channels_last_3d)
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


STATS_ROWS = 32768  # voxels per chunk of the GroupNorm statistics' second pass (32 channels: 4 MiB)


def group_stats(h: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, group) mean and variance of h [n, c, d, h, w] in float64, in any memory layout
    and for any float dtype.

    Two passes over h, read along its voxels in the layout it has: each channel's mean (one float32
    sum, which PyTorch takes pairwise), then its sum of squares about that mean over chunks of
    ``STATS_ROWS`` voxels, in float32 into one reused buffer (a bf16 chunk is read as float32), the
    chunks' sums added in float64.  A group's variance is the mean of its channels' plus the variance
    of their means (equal voxel counts).  ``torch.var_mean`` over a channels-last tensor (the
    transposed convs' output) reads it at a stride and took ~0.5 s for 32 channels at 128^3; a chunked
    one-pass version with matrix-vector sums 160-190 ms on a 2-core AVX2 EPYC, where this takes 40-50
    ms in float32 (a new buffer for every chunk cost a page fault per page, so the buffer is reused)."""
    n, c = h.shape[:2]
    if h.is_contiguous(memory_format=torch.channels_last_3d) and not h.is_contiguous():
        x, vdim = h.permute(0, 2, 3, 4, 1).reshape(n, -1, c), 1  # [n, voxels, c], a view
    else:
        x, vdim = h.reshape(n, c, -1), 2  # [n, c, voxels]
    v = x.shape[vdim]
    mean32 = x.sum(vdim, dtype=torch.float32, keepdim=True).div_(v)
    rows = min(STATS_ROWS, v)
    buf = torch.empty((n, rows, c) if vdim == 1 else (n, c, rows), dtype=torch.float32, device=h.device)
    part = torch.empty(n, c, dtype=torch.float32, device=h.device)
    m2 = torch.zeros(n, c, dtype=torch.float64, device=h.device)  # sum of squares about mean32
    for a in range(0, v, rows):
        xb = x.narrow(vdim, a, min(rows, v - a))
        d = buf.narrow(vdim, 0, xb.shape[vdim])
        if xb.dtype == torch.float32:
            torch.sub(xb, mean32, out=d)
        else:  # bf16: widen, then subtract in float32 (a mixed-dtype sub is about 3x slower)
            d.copy_(xb).sub_(mean32)
        d.square_()
        torch.sum(d, vdim, out=part)
        m2 += part
    # squares about mean32 overstate the variance by (exact mean - mean32)^2: ~(1e-7 x the mean)^2
    mean, var = mean32.flatten(1).double(), m2 / v
    mean, var = mean.view(n, groups, -1), var.view(n, groups, -1)
    gmean = mean.mean(-1)
    return gmean, var.mean(-1) + (mean - gmean[..., None]).square().mean(-1)


def group_norm_(h: torch.Tensor, norm: torch.nn.GroupNorm) -> torch.Tensor:
    """GroupNorm of h in place (statistics in float32/64, then one scale-and-shift pass).  The scale
    and shift are cast to h's dtype: a float32 operand would make a bf16 tensor's in-place update
    promote every element (about 3x slower), for no accuracy the bf16 result can keep."""
    return scale_shift_(h, *gn_affine(norm, *group_stats(h, norm.num_groups)))


def scale_shift_(h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """h * scale + shift in place, per (sample, channel), in h's dtype: one pass (``addcmul``; a
    ``mul_`` then an ``add_`` read and wrote h twice, 65 against 46 ms for 32 channels at 128^3 with
    the ReLU after it, 2-core AVX2 EPYC)."""
    sc = scale.to(h.dtype)[:, :, None, None, None]
    return torch.addcmul(shift.to(h.dtype)[:, :, None, None, None], h, sc, out=h)
