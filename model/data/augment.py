"""Augmentation for training on small data, on model-space volumes [B, 1, D, H, W] in [-1, 1].

Two kinds, both drawn from an explicit ``torch.Generator`` so a resumed run continues exactly:

* ``RandomAugment`` -- the real volumes, afresh every iteration, before they reach D and the
  encoders (the transforms TorchIO offers as RandomAffine, RandomElasticDeformation,
  RandomBiasField, RandomGamma and RandomNoise, done here as one ``grid_sample`` for the spatial
  part so a 128^3 volume costs one resampling): isotropic scale 0.85-1.15 (+-5 % per axis on top),
  rotations up to 10 degrees about each axis, shifts up to 4 % of the field of view, a smooth
  elastic displacement (a 5^3 grid of random offsets up to 2 % of the field of view, upsampled
  trilinearly), a smooth multiplicative bias field (exp of +-0.3), gamma 0.8-1.25 on the [0, 1]
  intensity, and Gaussian noise of sigma up to 0.02 inside the foreground.  Background stays -1.
* ``diff_augment`` -- differentiable augmentation of every input of D, real and generated alike
  (Zhao et al., "Differentiable Augmentation for Data-Efficient GAN Training", NeurIPS 2020):
  brightness, contrast, translation (zero-filled: background) and cutout, so D cannot memorise a
  small set and G still gets gradients through the same transforms.

Every random number is drawn per sample, for the whole batch at once, so a batch split over several
processes (data-parallel training, model/distributed.py) gets the same transforms: with
``rows=(global_n, lo, hi)`` the numbers of a batch of ``global_n`` are drawn and those of rows [lo, hi)
applied to ``x`` (which holds those rows), and the generator moves as it would for the whole batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BACKGROUND = -1.0


def _rows(rows: tuple[int, int, int] | None, b: int) -> tuple[int, int, int]:
    """(global_n, lo, hi) of a batch of ``b`` local rows; the whole batch when ``rows`` is None."""
    if rows is None:
        return b, 0, b
    n, lo, hi = (int(v) for v in rows)
    if not (0 <= lo <= hi <= n and hi - lo == b):
        raise ValueError(f"rows {rows} do not hold a batch of {b}")
    return n, lo, hi


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """[B, 3] angles (rad) about x, y, z -> [B, 3, 3] rotation matrices."""
    cx, cy, cz = angles.cos().unbind(1)
    sx, sy, sz = angles.sin().unbind(1)
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], 1).view(-1, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], 1).view(-1, 3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], 1).view(-1, 3, 3)
    return rz @ ry @ rx


class RandomAugment:
    """Random spatial and intensity transforms of real model-space volumes (see the module doc)."""

    def __init__(
        self,
        scale: tuple[float, float] = (0.85, 1.15),
        anisotropy: float = 0.05,
        degrees: float = 10.0,
        shift: float = 0.04,
        elastic: float = 0.02,
        bias: float = 0.3,
        gamma: tuple[float, float] = (0.8, 1.25),
        noise: float = 0.02,
    ) -> None:
        self.scale, self.anisotropy, self.degrees, self.shift = scale, anisotropy, degrees, shift
        self.elastic, self.bias, self.gamma, self.noise = elastic, bias, gamma, noise

    def describe(self) -> dict[str, float | list[float]]:
        return {
            "scale": list(self.scale),
            "anisotropy": self.anisotropy,
            "degrees": self.degrees,
            "shift": self.shift,
            "elastic": self.elastic,
            "bias": self.bias,
            "gamma": list(self.gamma),
            "noise": self.noise,
        }

    def __call__(self, x: torch.Tensor, gen: torch.Generator, rows: tuple[int, int, int] | None = None) -> torch.Tensor:
        """Transform the batch ``x``: rows [lo, hi) of a batch of ``global_n`` when ``rows`` is
        ``(global_n, lo, hi)`` (the draws are the whole batch's), the whole batch otherwise."""
        b = x.shape[0]
        dev = x.device
        n, r0, r1 = _rows(rows, b)

        def u(*shape: int, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:  # shape[0]: the batch
            return (torch.rand(n, *shape[1:], generator=gen) * (hi - lo) + lo)[r0:r1].to(dev)

        # spatial: output grid point p -> sample the input at A p + t + elastic(p) (normalised coords)
        s = torch.exp(u(b, 1, lo=math.log(self.scale[0]), hi=math.log(self.scale[1])))
        s = s * (1 + self.anisotropy * u(b, 3))
        rot = _rotation(u(b, 3) * math.radians(self.degrees))
        a = rot / s[:, None, :]  # sampling matrix: the content grows by s
        t = u(b, 3) * 2 * self.shift
        theta = torch.cat([a, t[:, :, None]], 2)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        if self.elastic > 0:
            coarse = u(b, 3, 5, 5, 5) * 2 * self.elastic
            disp = F.interpolate(coarse, size=x.shape[2:], mode="trilinear", align_corners=True)
            grid = grid + disp.permute(0, 2, 3, 4, 1)
        y = F.grid_sample(x - BACKGROUND, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        y = y + BACKGROUND
        # intensity, on the [0, 1] scale, foreground only
        fg = y > BACKGROUND + 1e-3
        v = ((y + 1) / 2).clamp(0, 1)
        if self.bias > 0:
            field = F.interpolate(u(b, 1, 3, 3, 3), size=x.shape[2:], mode="trilinear", align_corners=True)
            v = v * torch.exp(self.bias * field)
        g = torch.exp(u(b, 1, 1, 1, 1, lo=math.log(self.gamma[0]), hi=math.log(self.gamma[1])))
        v = v.clamp(0, 1) ** g
        if self.noise > 0:
            sigma = u(b, 1, 1, 1, 1, lo=0.0, hi=self.noise)
            v = v + sigma * torch.randn(n, *v.shape[1:], generator=gen)[r0:r1].to(dev)
        out = (v.clamp(0, 1) * 2 - 1).where(fg, torch.full_like(v, BACKGROUND))
        return out.contiguous()


DIFFAUG_POLICY = ("color", "translation", "cutout")


def diff_augment(
    x: torch.Tensor,
    gen: torch.Generator,
    policy: tuple[str, ...] = DIFFAUG_POLICY,
    translate: float = 0.125,
    cutout: float = 0.5,
    axes: tuple[int, ...] | None = None,
    rows: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """DiffAugment for model-space volumes [B, C, D, H, W] (or slices [B, C, H, W]): differentiable
    in ``x``, random parameters per sample drawn from ``gen``.  ``color``: brightness +-0.2 and
    contrast x0.5-1.5 about each volume's mean; ``translation``: integer shifts up to ``translate`` of
    the size along ``axes`` (default: every spatial axis; the vacated voxels are background);
    ``cutout``: one box of ``cutout`` of the size per axis (along ``axes``) set to background.
    ``rows=(global_n, lo, hi)``: ``x`` is rows [lo, hi) of a batch of ``global_n``, whose parameters
    are drawn (module docstring)."""
    b, dev = x.shape[0], x.device
    n, r0, r1 = _rows(rows, b)
    if axes is None:
        axes = tuple(range(2, x.ndim))  # every spatial axis
    per_sample = (b, *[1] * (x.ndim - 1))

    def u(*shape: int) -> torch.Tensor:  # shape[0]: the batch
        return torch.rand(n, *shape[1:], generator=gen)[r0:r1].to(dev)

    if "color" in policy:
        x = x + (u(*per_sample) - 0.5) * 0.4
        mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
        x = (x - mean) * (u(*per_sample) + 0.5) + mean
    if "translation" in policy:
        shifts = [
            (torch.floor(u(b) * (2 * int(x.shape[a] * translate) + 1)).long() - int(x.shape[a] * translate))
            for a in axes
        ]
        out = []
        for i in range(b):
            v = x[i : i + 1]
            for a, sh in zip(axes, shifts, strict=True):
                k = int(sh[i])
                if k:
                    v = torch.roll(v, k, dims=a)
                    idx = torch.arange(v.shape[a], device=dev)
                    keep = (idx >= k) if k > 0 else (idx < v.shape[a] + k)
                    shape = [1] * v.ndim
                    shape[a] = -1
                    v = torch.where(keep.view(shape), v, torch.full_like(v, BACKGROUND))
            out.append(v)
        x = torch.cat(out)
    if "cutout" in policy:
        mask = torch.ones_like(x[:, :1], dtype=torch.bool)
        for i in range(n):  # every sample of the whole batch draws; the rows here are cut
            sl: list[slice] = [slice(i - r0, i - r0 + 1), slice(None)]
            for a in range(2, x.ndim):
                size_a = x.shape[a]
                if a in axes:
                    size = max(1, int(size_a * cutout))
                    start = int(torch.rand(1, generator=gen).to(dev) * (size_a - size + 1))
                    sl.append(slice(start, start + size))
                else:
                    sl.append(slice(None))
            if r0 <= i < r1:
                mask[tuple(sl)] = False
        x = torch.where(mask, x, torch.full_like(x, BACKGROUND))
    return x
