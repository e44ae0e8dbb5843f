"""How much the in-training quality monitor's figure moves from the choice of its latents alone:
``QualityMonitor`` (model/training.py, as ``--monitor-every`` runs it) on one HA-GAN model directory
(a run's checkpoint or RUN/model) with several latent seeds, so a change between two monitored
iterations can be read against it.  The training monitor always uses seed 4321.

    python benchmarks/monitor_noise.py RUN/checkpoints/iter_0002800 --data DATASET [--seeds 4321 1 2 3 4] [--n 8]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", help="an HA-GAN model directory (config.json + model.safetensors)")
    ap.add_argument("--data", required=True, help="the run's prepared dataset")
    ap.add_argument("--seeds", type=int, nargs="*", default=[4321, 1, 2, 3, 4])
    ap.add_argument("--n", type=int, default=8, help="volumes per reading (the monitor's monitor_n)")
    a = ap.parse_args()
    import torch

    from model.data.datasets import VolumeDataset
    from model.registry import from_pretrained
    from model.training import QualityMonitor

    m = from_pretrained(a.model)
    net, cfg = m.net, m.config
    data = VolumeDataset(a.data)

    def generate(z: torch.Tensor) -> torch.Tensor:
        return net.gh(net.features(z, None))

    print(f"{a.model}: n = {a.n} volumes per reading\n")
    print("| latent seed | fd_texture | floor (mean +- sd) | coarse-anatomy spread |")
    print("|---|---|---|---|")
    fds = []
    with tempfile.TemporaryDirectory() as run:
        for seed in a.seeds:
            q = QualityMonitor(Path(run), (cfg.resolution,) * 3, a.n, cfg.latent_dim, seed=seed)
            out = q(0, len(data), data.volume, generate, cfg.to_dict(), net.state_dict)
            fds.append(out["q_fd_texture"])
            print(f"| {seed} | {out['q_fd_texture']:.1f} | {out['q_floor']:.1f} +- {out['q_floor_sd']:.1f} | "
                  f"{out['q_spread']:.2f}x |")  # fmt: skip
    print(
        f"\nfd_texture over the seeds: mean {np.mean(fds):.1f}, sd {np.std(fds, ddof=1):.1f}, "
        f"range {min(fds):.1f}-{max(fds):.1f}"
    )


if __name__ == "__main__":
    main()
