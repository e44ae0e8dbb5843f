"""How fast HA-GAN's generator can learn anatomy at all: G alone fitted by L1 to a few real training
volumes from as many fixed latents, the way the trainer feeds it (a random high-resolution sub-volume
plus the average-pooled low-resolution volume each iteration, Adam with the trainer's betas), no D
and no encoder.  This is an upper bound on what the adversarial game can teach G in as many
iterations: if G cannot draw the ventricles of two volumes it is shown directly, it cannot invent them
from D's judgement either.

Every ``--every`` iterations it prints the full-volume L1 (G^H on the whole feature map, eval mode)
against the targets, beside the L1 of the voxel-wise median of the targets (what a G that learned
only the average brain scores), and renders the three mid slices of each output beside its target
to ``--png-dir``.

    python benchmarks/probe_g_fit.py --data DATASET --iterations 400 --lr 3e-4 [--whole-stats off]

Levers: ``--whole-stats off`` (G^H's slab normalised by its own statistics, the authors'), ``--lr-heads``
(a learning rate of its own for G^L and G^H), ``--width``, ``--beta1``, and ``--sub-volume off`` (G^H's
whole volume supervised every iteration instead of one sub-volume of R/8 slices: what several
sub-volumes per iteration would approach).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a prepared dataset (voxgen prepare)")
    ap.add_argument("--volumes", default="0,-1", help="indices of the volumes to fit (comma-separated)")
    ap.add_argument("--iterations", type=int, default=400)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lr-heads", type=float, default=None, help="lr of G^L and G^H (default: --lr)")
    ap.add_argument("--beta1", type=float, default=0.0, help="Adam beta1 (the trainer's: 0)")
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--gh-width", type=float, default=0.0, help="G^H's hidden width (0: --width's)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--latent-dim", type=int, default=64)
    ap.add_argument("--norm-min-group", type=int, default=2)
    ap.add_argument("--whole-stats", choices=("on", "off"), default="on", help="G^H's GroupNorm statistics")
    ap.add_argument("--sub-volume", choices=("on", "off"), default="on", help="off: G^H's whole volume each iteration")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--png-dir", default=None, help="where to render slices (default: none)")
    a = ap.parse_args()
    from model.data.datasets import VolumeDataset
    from model.hagan.config import HAGANConfig
    from model.hagan.networks import HAGAN

    data = VolumeDataset(a.data)
    idx = [int(i) % len(data) for i in a.volumes.split(",")]
    x = torch.from_numpy(np.stack([np.asarray(data.volume(i), np.float32) for i in idx]))[:, None]
    res = x.shape[-1]
    torch.manual_seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = HAGANConfig(
        resolution=res, latent_dim=a.latent_dim, width=a.width, norm_min_group=a.norm_min_group, gh_width=a.gh_width
    )
    net = HAGAN(cfg).train()
    net.set_mixed_layout(True)
    heads = a.lr if a.lr_heads is None else a.lr_heads
    groups = [
        {"params": list(net.ga.parameters()), "lr": a.lr},
        {"params": [*net.gl.parameters(), *net.gh.parameters()], "lr": heads},
    ]
    opt = torch.optim.Adam(groups, lr=a.lr, betas=(a.beta1, 0.999))
    z = torch.randn(len(idx), a.latent_dim, generator=torch.Generator().manual_seed(a.seed + 5))
    rng = np.random.default_rng(a.seed)
    s, d = net.feat_scale, net.sub_depth
    x_low = F.avg_pool3d(x, s)
    median_l1 = float((x - x.median(0, keepdim=True).values).abs().mean())
    png = Path(a.png_dir) if a.png_dir else None
    if png:
        png.mkdir(parents=True, exist_ok=True)
    print(
        f"G of width {a.width} (G^H {a.gh_width or a.width}), latent {a.latent_dim}, {res}^3; "
        f"{len(idx)} volumes {idx}; "
        f"lr {a.lr} (G^L, G^H: {heads}), beta1 {a.beta1}, whole-stats {a.whole_stats}, "
        f"sub-volume {a.sub_volume}; L1 of the targets' median: {median_l1:.4f}\n"
    )
    print("| iteration | full-volume L1 | / median's | s |")
    print("|---|---|---|---|")
    t0 = time.perf_counter()
    for it in range(1, a.iterations + 1):
        r = int(rng.integers(0, res - d + 1))
        if a.sub_volume == "on":
            hi, lo = net.generate_train(z, r, None, a.whole_stats == "on")
            loss = (F.l1_loss(hi, x[:, :, r : r + d]) + F.l1_loss(lo, x_low)) / 2
        else:
            f = net.features(z)
            loss = (F.l1_loss(net.gh(f), x) + F.l1_loss(net.gl(f), x_low)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it % a.every and it != a.iterations:
            continue
        net.eval()
        with torch.no_grad():
            v = net.gh(net.features(z))
        net.train()
        full = float((v - x).abs().mean())
        print(f"| {it} | {full:.4f} | {full / median_l1:.2f} | {time.perf_counter() - t0:.0f} |", flush=True)
        if png:
            from PIL import Image

            c = res // 2
            rows = [
                np.concatenate([a_[c], a_[:, c], a_[:, :, c]] + [t[c], t[:, c], t[:, :, c]], 1)
                for a_, t in zip(v[:, 0].numpy(), x[:, 0].numpy(), strict=True)
            ]
            img = ((np.concatenate(rows, 0) + 1) * 127.5).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(png / f"fit_{it:05d}.png")


if __name__ == "__main__":
    main()
