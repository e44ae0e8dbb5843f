"""Projection of a volume into W (3D-StyleGAN, Hong et al. 2021, section 2.1) and style mixing.

Projection optimises one w per volume (broadcast to every layer), and optionally the constant
noise maps, starting from ``w_avg``, to minimise MSE at full resolution plus MSE after 8x
average pooling (the second term for stability; LPIPS has no 3D counterpart).  As in StyleGAN2's
projector, the learning rate ramps up then down (cosine) and w is perturbed by Gaussian noise
that decays over the first 3/4 of the steps; optimised noise maps are renormalised to zero mean
and unit variance after each step.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.base import Progress
from model.stylegan3d.networks import Generator, SynthesisNetwork


@dataclass
class Projection:
    w: torch.Tensor  # [1, w_dim]
    losses: list[float]  # the objective at every step (before the step's update)
    noise: dict[str, torch.Tensor]  # the noise maps used (optimised if asked)


def pooled_mse(a: torch.Tensor, b: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """MSE after ``factor``x average pooling (per axis, capped at the axis size)."""
    k = tuple(min(factor, s) for s in a.shape[2:])
    pool = F.avg_pool3d if a.ndim == 5 else F.avg_pool2d
    return F.mse_loss(pool(a, k), pool(b, k))


def projection_loss(img: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(img, target) + pooled_mse(img, target, 8)


def project(
    G: Generator,
    target: torch.Tensor,
    *,
    steps: int = 200,
    lr: float = 0.1,
    optimize_noise: bool = False,
    w_noise_scale: float = 0.05,
    seed: int = 0,
    progress: Progress | None = None,
) -> Projection:
    """Project one volume ``target`` [1, 1, *shape] (model space) into W."""
    if target.ndim not in (4, 5) or target.shape[:2] != (1, 1):
        raise ValueError(f"target must have shape [1, 1, *spatial], got {list(target.shape)}")
    device = G.mapping.w_avg.device
    target = target.to(device, torch.float32)
    synth: SynthesisNetwork = copy.deepcopy(G.synthesis).requires_grad_(False)
    noise_bufs = {n: b for n, b in synth.named_buffers() if n.endswith("noise_const")}
    for b in noise_bufs.values():
        b.requires_grad_(optimize_noise)
    gen = torch.Generator().manual_seed(seed)
    # spread of W, for the perturbation scale: from a few mapped samples (as StyleGAN2's projector)
    with torch.no_grad():
        z = torch.randn(1000, G.mapping.z_dim, generator=gen).to(device)
        w_std = float((G.mapping(z, broadcast=False) - G.mapping.w_avg).square().sum(1).mean().sqrt())
    w_opt = G.mapping.w_avg.detach().clone().unsqueeze(0).requires_grad_(True)
    params = [w_opt] + (list(noise_bufs.values()) if optimize_noise else [])
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    losses: list[float] = []
    for step in range(steps):
        t = step / max(steps, 1)
        down = min(1.0, (1.0 - t) / 0.25)  # cosine ramp-down over the last quarter
        ramp = (0.5 - 0.5 * math.cos(math.pi * down)) * min(1.0, (step + 1) / max(1, steps) / 0.05)
        for group in opt.param_groups:
            group["lr"] = lr * max(ramp, 1e-3)
        noise_scale = w_std * w_noise_scale * max(0.0, 1.0 - t / 0.75) ** 2
        w_in = w_opt + torch.randn(w_opt.shape, generator=gen).to(device) * noise_scale
        img = synth(w_in.unsqueeze(1).repeat(1, synth.num_ws, 1), noise_mode="const")
        loss = projection_loss(img, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if optimize_noise:
            with torch.no_grad():
                for b in noise_bufs.values():
                    b.sub_(b.mean()).div_(b.std().clamp_min(1e-8))
        if progress:
            progress(step + 1, steps, "project")
    return Projection(w=w_opt.detach().cpu(), losses=losses, noise={n: b.detach().cpu() for n, b in noise_bufs.items()})


def style_mix(ws_coarse: torch.Tensor, ws_fine: torch.Tensor, block: int) -> torch.Tensor:
    """ws [n, num_ws, w_dim]: synthesis blocks ``< block`` take ``ws_coarse``, blocks ``>= block``
    take ``ws_fine`` (3D-StyleGAN section 3: coarse styles set the outline, fine ones the detail)."""
    if ws_coarse.shape != ws_fine.shape or ws_coarse.ndim != 3:
        raise ValueError(
            f"ws must be two [n, num_ws, w_dim] tensors, got {list(ws_coarse.shape)}, {list(ws_fine.shape)}"
        )
    num_blocks = ws_coarse.shape[1] // 2
    if not 0 <= block <= num_blocks:
        raise ValueError(f"block must be in 0..{num_blocks}, got {block}")
    start = SynthesisNetwork.block_ws_start(block) if block < num_blocks else ws_coarse.shape[1]
    out = ws_coarse.clone()
    out[:, start:] = ws_fine[:, start:]
    return out
