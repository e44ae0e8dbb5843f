"""Latent fitting after an amortised encoder: the encoder's code, refined by gradient steps on the
reconstruction error (the hybrid GAN inversion of in-domain inversion: an encoder's guess, then
optimisation of the latent alone, the generator frozen).

An amortised encoder answers in one pass but only as well as it learnt to invert G on its training
data; a scan unlike them (another template, a brain of another size) comes back farther from what G
can draw.  ``fit_latent`` starts from the encoder's code and takes ``steps`` Adam steps on the L1
between G(z) and the scan in model space, the loss the encoders were trained with, and keeps the best
code it saw: the reconstruction error after the fit is never above the encoder's.  Each step is one
generation forward and backward (the generator's weights get no gradients)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from model.latent import FIT_LR, MAX_FIT_STEPS


def fit_latent(
    decode: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    z0: torch.Tensor,
    steps: int,
    *,
    lr: float = FIT_LR,
    progress: Callable[[int, int, str], Any] | None = None,
) -> torch.Tensor:
    """Refine the codes ``z0`` [n, latent] of the volumes ``x`` [n, ...] so that ``decode(z)`` (a
    differentiable generator: [1, latent] -> a volume shaped like ``x[i:i+1]``) matches ``x`` in mean
    absolute error.  Each volume is fitted on its own: ``steps`` Adam steps (learning rate ``lr``, in
    the latent's units: a standard-normal prior's spread is 1), and the code with the lowest error among
    the start, every step and the end is returned (float32, on ``z0``'s device).  ``progress(done,
    total, "fit")`` after each step.  ``steps`` 0 returns ``z0`` unchanged."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= MAX_FIT_STEPS:
        raise ValueError(f"steps must be an integer in [0, {MAX_FIT_STEPS}], got {steps!r}")
    if steps == 0:
        return z0
    if x.shape[0] != z0.shape[0]:
        raise ValueError(f"{x.shape[0]} volumes but {z0.shape[0]} codes")
    out = []
    total = steps * x.shape[0]
    with torch.inference_mode(False), torch.enable_grad():
        for i in range(x.shape[0]):
            target = x[i : i + 1].float().clone()
            z = z0[i : i + 1].float().clone().requires_grad_(True)
            opt = torch.optim.Adam([z], lr=lr)
            best, best_z = float("inf"), z.detach().clone()
            for k in range(steps):
                loss = (decode(z).float() - target).abs().mean()
                val = float(loss.detach())
                if val < best:
                    best, best_z = val, z.detach().clone()
                (grad,) = torch.autograd.grad(loss, [z])  # the generator's weights get none
                z.grad = grad
                opt.step()
                if progress:
                    progress(i * steps + k + 1, total, "fit")
            with torch.no_grad():
                if float((decode(z).float() - target).abs().mean()) < best:
                    best_z = z.detach().clone()
            out.append(best_z)
    return torch.cat(out).to(z0.device)
