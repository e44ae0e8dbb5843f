"""What an HA-GAN training checkpoint's discriminators say: the mean logits of D^H (on sub-volumes
at three starts) and D^L (on the average-pooled whole volume) for real training volumes, for the
live G's samples, and for "uniform brains" (each real volume's foreground set to one intensity: the
right outline without internal anatomy).  A D that scores the uniform brains like real volumes
gives G no reason to draw ventricles, cortex or grey/white contrast.  No augmentation, eval mode.

    python benchmarks/probe_hagan_d.py RUN/checkpoints/iter_0001500 --data DATASET [--n 9]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", help="a training checkpoint folder (checkpoints/iter_N)")
    ap.add_argument("--data", required=True, help="the run's prepared dataset")
    ap.add_argument("--n", type=int, default=9, help="real volumes (spread over the dataset) and samples")
    a = ap.parse_args()
    from model.checkpoint import read_training_checkpoint
    from model.data.datasets import VolumeDataset
    from model.hagan.config import HAGANConfig
    from model.hagan.networks import HAGAN

    ck = read_training_checkpoint(a.checkpoint)
    cfg = HAGANConfig.from_dict(ck.config())
    net = HAGAN(cfg)
    net.load_state_dict(ck.weights() | ck.extra("live."))  # the live G where the run has an EMA
    net.eval()
    data = VolumeDataset(a.data)
    idx = np.linspace(0, len(data) - 1, a.n).round().astype(int)
    real = torch.from_numpy(np.stack([np.asarray(data.volume(int(i)), np.float32) for i in idx]))[:, None]
    fg = real > -0.5
    uniform = torch.where(fg, real[fg].mean(), torch.full_like(real, float(real[~fg].mean())))
    s, depth = net.feat_scale, net.sub_depth
    starts = [cfg.resolution // 4, cfg.resolution // 2 - depth // 2, 3 * cfg.resolution // 4 - depth]
    with torch.no_grad():
        z = torch.randn(a.n, cfg.latent_dim, generator=torch.Generator().manual_seed(0))
        fake = net.gh(net.features(z, None))
        print(f"{a.checkpoint}: iteration {ck.iteration}; D^H at starts {starts}, D^L on {cfg.resolution // s}^3\n")
        print("| volumes | D^H logit per start | D^L logit |")
        print("|---|---|---|")
        for name, v in (("real", real), ("generated (live G)", fake), ("uniform brains", uniform)):
            h = [float(net.dh(v[:, :, r : r + depth], r)[0].mean()) for r in starts]
            lo = float(net.dl(F.avg_pool3d(v, s))[0].mean())
            print(f"| {name} | {' / '.join(f'{x:.2f}' for x in h)} | {lo:.2f} |")


if __name__ == "__main__":
    main()
