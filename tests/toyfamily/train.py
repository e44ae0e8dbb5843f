"""The toy family's trainer: its generator and encoder as an autoencoder of the prepared volumes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.base import Intensity, Progress
from model.data.datasets import VolumeDataset
from model.data.grid import resample
from tests.toyfamily.config import ToyConfig
from tests.toyfamily.model import ToyModel


def train(options: dict[str, Any], progress: Progress | None = None) -> Path:
    data = VolumeDataset(options["data"])
    mf = data.manifest
    cfg = ToyConfig(modality=mf["modality"], intensity=Intensity(**mf["intensity"]))
    m = ToyModel.init(cfg, seed=int(options.get("seed") or 0))
    x = torch.from_numpy(np.stack([np.asarray(data.volume(i), np.float32) for i in range(len(data))]))[:, None]
    x = resample(x, cfg.output_shape)
    opt = torch.optim.Adam(m.net.parameters(), lr=1e-2)
    steps = int(options.get("iterations") or 20)
    m.net.train()
    for i in range(steps):
        loss = torch.nn.functional.mse_loss(m.net.generate(m.net.encode(x)), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress:
            progress(i + 1, steps, f"train loss {loss.item():.4f}")
    m.net.eval()
    return m.save_pretrained(Path(options["output"]) / "model")
