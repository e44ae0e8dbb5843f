"""The toy family's loaded model and its ``voxgen init``."""

from __future__ import annotations

from typing import Any

import torch

from model.base import Intensity, Progress, VolumeModel, check_latent
from model.data.grid import resample
from tests.toyfamily.config import ToyConfig
from tests.toyfamily.networks import ToyNet, parameter_counts


class ToyModel(VolumeModel[ToyConfig, ToyNet]):
    family = "toy"
    config_class = ToyConfig
    net_class = ToyNet
    count_parameters = staticmethod(parameter_counts)

    @torch.no_grad()
    def generate(self, z: torch.Tensor, label: Any = None, progress: Progress | None = None, **kw: Any) -> torch.Tensor:
        check_latent(z, self.latent_dim)
        out = self.net.generate(z.to(self.device, torch.float32)).float().cpu()
        if progress:
            progress(len(z), len(z), "generate")
        return out

    @torch.no_grad()
    def encode(self, x: torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
        x = resample(x, self.output_shape)
        return self.net.encode(x.to(self.device)).float().cpu()


def init_cli(a: Any) -> int:
    cfg = ToyConfig(
        modality=a.modality,
        intensity=Intensity.for_modality(a.modality),
        spacing=tuple(a.spacing) if a.spacing else (8.0, 8.0, 8.0),
        latent_dim=a.latent_dim or 8,
    )
    ToyModel.init(cfg, seed=a.seed).save_pretrained(a.output)
    print(f"wrote an untrained toy model to {a.output}")
    return 0
