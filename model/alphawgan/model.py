"""A loaded 3D alpha-WGAN-GP model: the surface the worker, the CLI and ``voxgen evaluate`` use
(the same as ``model.hagan.model.HAGANModel``).  ``encode`` is the trained encoder E, so
``generate(encode(x))`` reconstructs a scan: ``load_for_model`` brings the scan to the cube the
training data were prepared on (``config.cube()``) and ``encode`` averages it down to the 64^3 grid
as the trainer does."""

from __future__ import annotations

import os
from typing import Any

import torch

from model.alphawgan.config import AlphaWGANConfig
from model.alphawgan.networks import AlphaWGAN, parameter_counts
from model.base import Intensity, Progress, VolumeModel, check_latent


class AlphaWGANModel(VolumeModel[AlphaWGANConfig, AlphaWGAN]):
    """``generate(z)`` -> [n, 1, 64, 64, 64] float32 in [-1, 1] on the CPU; ``encode(x)`` -> [n, latent].

    ``sample_latents`` draws standard-normal latents: the prior the code discriminator matches."""

    family = "alphawgan"
    config_class = AlphaWGANConfig
    net_class = AlphaWGAN
    count_parameters = staticmethod(parameter_counts)
    generator_parts = ("g",)  # serving: the critic and the code critic are never read
    encoder_parts = ("e",)

    def __init__(self, net: AlphaWGAN, device: str | torch.device = "cpu", batch: int = 8) -> None:
        # eval (in the base class): BatchNorm uses its running statistics
        super().__init__(net.requires_grad_(False), device)
        self.batch = batch

    # ---------------------------------------------------------------- generation and encoding
    @torch.no_grad()
    def generate(
        self, z: torch.Tensor, label: Any = None, *, progress: Progress | None = None, **kw: Any
    ) -> torch.Tensor:
        """Latents [n, latent_dim] -> volumes [n, 1, 64, 64, 64].  HA-GAN's keywords (mode, budget_mb)
        are accepted and ignored: a 64^3 volume always fits."""
        if label is not None:
            raise ValueError("this model is not class-conditional; label must be None")
        check_latent(z, self.latent_dim)
        n = z.shape[0]
        out = torch.empty(n, 1, *self.output_shape, dtype=torch.float32)
        for s in range(0, n, self.batch):
            out[s : s + self.batch] = self.net.g(z[s : s + self.batch].to(self.device, torch.float32)).float().cpu()
            if progress:
                progress(min(n, s + self.batch), n, "generate")
        return out

    def encode(self, x: torch.Tensor, progress: Progress | None = None, *, steps: int | None = None) -> torch.Tensor:
        """Volumes in model space -> latents [n, latent_dim] (the encoder E): [n, 1, R, R, R] on the
        cube the model was trained from (``data_resolution``, what ``load_for_model`` gives),
        averaged down to the 64^3 grid by ``model.data.grid.resample`` as the trainer does
        (``to_grid``), or [n, 1, 64, 64, 64] already on the grid.  ``steps`` > 0: E's codes then
        fitted by that many Adam steps on the L1 between G(z) and the volume on the 64^3 grid
        (``model.latent.fit``, G frozen); 0 or None: the encoder alone."""
        x = self.to_grid(x)
        self.need(self.encoder_parts)
        n = x.shape[0]
        zs = []
        with torch.no_grad():
            for s in range(0, n, self.batch):
                zs.append(self.net.e(x[s : s + self.batch].to(self.device, torch.float32)).float().cpu())
                if progress:
                    progress(min(n, s + self.batch), n, "encode")
        z = torch.cat(zs, 0)
        if steps:
            from model.latent.fit import fit_latent

            self.need(self.generator_parts)
            g = self.net.g
            z = fit_latent(g, x.to(self.device, torch.float32), z.to(self.device), steps, progress=progress).cpu()
        return z

    def reconstruct(self, x: torch.Tensor, label: Any = None, **kw: Any) -> torch.Tensor:
        return self.generate(self.encode(x), label, **kw)


def init_model_dir(
    output: str | os.PathLike,
    *,
    latent_dim: int = 1000,
    width: float = 1.0,
    code_hidden: int = 4096,
    modality: str = "mri",
    spacing: tuple[float, float, float] | None = None,
    seed: int = 0,
) -> AlphaWGANModel:
    """Write a freshly initialised (untrained) alpha-WGAN-GP model directory (``voxgen init``)."""
    cfg = AlphaWGANConfig(
        latent_dim=latent_dim,
        width=width,
        code_hidden=code_hidden,
        modality=modality,
        intensity=Intensity.for_modality(modality),
        spacing=spacing or (1.0, 1.0, 1.0),
        description="UNTRAINED: a freshly initialised alpha-WGAN-GP with random weights; its volumes are not anatomy",
    )
    m = AlphaWGANModel.init(cfg, seed=seed)
    m.save_pretrained(output)
    return m


def init_cli(a: Any) -> int:
    """voxgen init --family alphawgan."""
    m = init_model_dir(
        a.output,
        latent_dim=a.latent_dim or 1000,
        width=a.width,
        modality=a.modality,
        spacing=tuple(a.spacing) if a.spacing else None,
        seed=a.seed,
    )
    print(f"wrote an untrained alpha-WGAN-GP (64^3, latent {m.latent_dim}, width {m.config.width}) to {a.output}")
    return 0
