"""A loaded 3D-StyleGAN / Split&Shuffle-GAN model: the surface the worker and the CLI use
(the same as ``model.hagan.model.HAGANModel``).

The served latent of this family is **w** (``latent_dim = w_dim``): ``sample_latents(n, seed)``
draws z from the seed and maps it to w, ``generate(w)`` synthesises from w, ``encode`` (a
projection) returns w, so that generate -> latent -> generate, encode -> generate (a
reconstruction) and traversal along a direction all work in one space, W, where the paper edits.
``space="z"`` gives ``generate``/``ws``/``mix`` a z instead.  The mapping network always runs on
the CPU (it is tiny), so a seed gives the same w on every device.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from model.base import Progress, VolumeModel, check_latent, seeded_normal
from model.data.grid import resample
from model.stylegan3d.config import StyleGAN3DConfig
from model.stylegan3d.networks import MappingNetwork, StyleGAN3D, parameter_counts
from model.stylegan3d.project import Projection, project, style_mix


class StyleGAN3DModel(VolumeModel[StyleGAN3DConfig, StyleGAN3D]):
    """``generate(w)`` -> [n, 1, D, H, W] float32 in model space ([-1, 1]) on the CPU.

    ``latent_dim`` is the config's, which is ``w_dim``: the served latent is w."""

    latent_space = "w"
    latent_space_of_encode = "w"
    config_class = StyleGAN3DConfig
    net_class = StyleGAN3D
    count_parameters = staticmethod(parameter_counts)
    generator_parts = ("G",)  # serving and projection: D is never read

    def __init__(self, net: StyleGAN3D, device: str | torch.device = "cpu") -> None:
        super().__init__(net.requires_grad_(False), device)
        self.family = net.config.family
        self._mapping_cpu: MappingNetwork | None = None

    @property
    def mapping(self) -> MappingNetwork:
        """A CPU copy of the mapping network (z -> w is the same on every device)."""
        if self._mapping_cpu is None:
            self._mapping_cpu = copy.deepcopy(self.net.G.mapping).cpu().float()
        return self._mapping_cpu

    # ---------------------------------------------------------------- description
    @property
    def w_dim(self) -> int:
        return self.config.w_dim

    def info(self) -> dict[str, Any]:
        return {
            **super().info(),
            "variant": self.config.variant,
            "latent_space": self.latent_space,
            "latent_space_of_encode": self.latent_space_of_encode,
        }

    # ---------------------------------------------------------------- latents
    def sample_z(self, n: int, seed: int) -> torch.Tensor:
        """Standard-normal z [n, z_dim] from a CPU generator: the same on every device."""
        return seeded_normal(n, seed, self.config.z_dim)

    @torch.no_grad()
    def sample_latents(self, n: int, seed: int, *, truncation_psi: float = 1.0) -> torch.Tensor:
        """w [n, w_dim] (CPU float32): z from ``seed`` through the mapping network, truncated
        towards ``w_avg`` by ``truncation_psi`` (1 = none)."""
        return self.mapping(self.sample_z(n, seed), truncation_psi, broadcast=False)

    def _check_latent(self, z: torch.Tensor, space: str) -> torch.Tensor:
        if space not in ("z", "w"):
            raise ValueError(f"space must be 'z' or 'w', got {space!r}")
        dim = self.config.z_dim if space == "z" else self.config.w_dim
        check_latent(z, dim, f"latent ({space})")
        return z.detach().cpu().float()

    @torch.no_grad()
    def ws(self, latent: torch.Tensor, *, truncation_psi: float = 1.0, space: str = "w") -> torch.Tensor:
        """Per-layer styles [n, num_ws, w_dim] (CPU) for w (truncated, broadcast) or z (mapped first)."""
        x = self._check_latent(latent, space)
        m = self.mapping
        if space == "z":
            return m(x, truncation_psi)
        if truncation_psi != 1.0:
            x = m.w_avg.lerp(x, truncation_psi)
        return x.unsqueeze(1).repeat(1, m.num_ws, 1)

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def synthesize(
        self, ws: torch.Tensor, *, noise_mode: str = "const", batch: int = 4, progress: Progress | None = None
    ) -> torch.Tensor:
        n = ws.shape[0]
        out = torch.empty(n, 1, *self.output_shape, dtype=torch.float32)
        for s in range(0, n, batch):
            img = self.net.G.synthesis(ws[s : s + batch].to(self.device), noise_mode=noise_mode).float().cpu()
            out[s : s + batch] = img.reshape(img.shape[0], 1, *self.output_shape)
            if progress:
                progress(min(n, s + batch), n, "generate")
        return out

    def generate(
        self,
        z: torch.Tensor,
        label: Any = None,
        *,
        truncation_psi: float = 1.0,
        space: str = "w",
        noise_mode: str = "const",
        progress: Progress | None = None,
        **kw: Any,
    ) -> torch.Tensor:
        """Latents w [n, w_dim] (or z [n, z_dim] with ``space="z"``) -> [n, 1, D, H, W] float32 on the CPU.

        ``noise_mode="const"`` (default) uses the stored noise maps, so generation is a function of
        the latent alone; "none" drops the noise.  HA-GAN's keywords (mode, budget_mb) are ignored.
        """
        if label is not None:
            raise ValueError("this model is not class-conditional; label must be None")
        if noise_mode not in ("const", "none"):
            raise ValueError(f"noise_mode must be 'const' or 'none', got {noise_mode!r}")
        return self.synthesize(
            self.ws(z, truncation_psi=truncation_psi, space=space), noise_mode=noise_mode, progress=progress
        )

    def mix(
        self,
        z_coarse: torch.Tensor,
        z_fine: torch.Tensor,
        block: int,
        *,
        truncation_psi: float = 1.0,
        space: str = "w",
        progress: Progress | None = None,
    ) -> torch.Tensor:
        """Style mixing: blocks < ``block`` from ``z_coarse``, blocks >= ``block`` from ``z_fine``."""
        ws = style_mix(
            self.ws(z_coarse, truncation_psi=truncation_psi, space=space),
            self.ws(z_fine, truncation_psi=truncation_psi, space=space),
            block,
        )
        return self.synthesize(ws, progress=progress)

    # ---------------------------------------------------------------- projection
    def project(self, x: torch.Tensor, *, steps: int = 200, progress: Progress | None = None, **kw: Any) -> Projection:
        """One volume [1, 1, D, H, W] (model space) -> ``Projection`` (w, loss curve, noise maps)."""
        with torch.enable_grad():
            return project(self.net.G, x.reshape(1, 1, *self.config.image_shape), steps=steps, progress=progress, **kw)

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Volumes [n, 1, *S] in model space (e.g. the R^3 cube of ``load_for_model``, ``config.cube()``)
        -> what the networks see, [n, 1, *image_shape]: resampled to ``shape`` by
        ``model.data.grid.resample`` as the training data were; a 2D model takes the middle axial
        slice of that grid.  Any grid is accepted (it is taken to span the cube's field of view)."""
        if x.ndim != 5 or x.shape[1] != 1 or min(x.shape[2:]) < 1:
            raise ValueError(f"volume must have shape [n, 1, D, H, W], got {list(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("volume contains NaN or infinite values")
        shape = self.config.shape
        if self.config.dims == 2 and x.shape[2] == 1:  # already one slice
            return resample(x[:, :, 0], shape[1:])
        g = resample(x, shape)
        return g[:, :, shape[0] // 2] if self.config.dims == 2 else g

    def encode(self, x: torch.Tensor, progress: Progress | None = None, *, steps: int | None = None) -> torch.Tensor:
        """Volumes [n, 1, D', H', W'] in model space -> w [n, w_dim] by projection (w only, so that
        ``generate(w)`` reproduces the fit with the stored noise maps), ``steps`` optimisation steps
        (default: the config's ``projection_steps``).  Any grid is accepted and resampled to the
        model's (``to_grid``)."""
        steps = int(steps or self.config.projection_steps)
        x = self.to_grid(x)
        n = x.shape[0]
        ws = []
        for i in range(n):

            def sub(done: int, total: int, stage: str, i: int = i) -> None:
                if progress:
                    progress(i * total + done, n * total, stage)

            ws.append(self.project(x[i : i + 1], steps=steps, progress=sub).w)
        return torch.cat(ws, 0)

    def reconstruct(self, x: torch.Tensor, label: Any = None, **kw: Any) -> torch.Tensor:
        return self.generate(self.encode(x), label, **kw)


def init_cli(a: Any) -> int:
    """voxgen init --family splitshuffle | stylegan3d."""
    from model.base import Intensity

    shape = tuple(int(x) for x in a.shape.lower().split("x")) if a.shape else (32, 64, 64)
    if len(shape) != 3:
        raise ValueError(f"--shape must be DxHxW, e.g. 32x64x64, got {a.shape!r}")
    cfg = StyleGAN3DConfig.for_variant(
        a.family,
        a.variant,
        shape=shape,
        modality=a.modality,
        spacing=tuple(a.spacing) if a.spacing else (1.0, 1.0, 1.0),
        intensity=Intensity.for_modality(a.modality),
        description=f"UNTRAINED: a freshly initialised {a.family} model with random weights; not anatomy",
    )
    m = StyleGAN3DModel.init(cfg, seed=a.seed)
    m.save_pretrained(a.output)
    n = m.info()["parameters"]["total_parameters"]
    print(f"wrote an untrained {a.family} ({cfg.variant}, {'x'.join(map(str, shape))}, {n:,} parameters) to {a.output}")
    return 0
