"""The toy family's networks: a linear generator and a linear encoder, both through tanh / none."""

from __future__ import annotations

import torch

from tests.toyfamily.config import ToyConfig


class ToyNet(torch.nn.Module):
    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        voxels = config.resolution**3
        self.g = torch.nn.Linear(config.latent_dim, voxels)
        self.e = torch.nn.Linear(voxels, config.latent_dim)

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        r = self.config.resolution
        return torch.tanh(self.g(z)).view(-1, 1, r, r, r)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.e(x.flatten(1))


def parameter_counts(net: ToyNet) -> dict[str, int]:
    return {"total_parameters": sum(p.numel() for p in net.parameters())}
