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

GLO mode (``--volumes all --batch 2 --learn-codes``): every training volume gets a latent of its own,
learnt with G (generative latent optimisation, Bojanowski et al. 2018), ``--batch`` volumes drawn per
iteration, the codes' squared norm pulled to the prior's by ``--code-prior``, ``--code-noise`` sd of
Gaussian noise added to them on the way into G (so G learns each code's neighbourhood, not the point);
the renders then add four samples from the Gaussian fitted to the codes (mean and covariance,
eigenvalues floored at 1 %), what a model trained this way would serve.

Levers: ``--whole-stats off`` (G^H's slab normalised by its own statistics, the authors'), ``--lr-heads``
(a learning rate of its own for G^L and G^H), ``--width``, ``--beta1``, and ``--sub-volume off`` (G^H's
whole volume supervised every iteration instead of one sub-volume of R/8 slices: what several
sub-volumes per iteration would approach).  ``--amp on`` runs G's forward in bf16 autocast: on a 2-core
Intel Xeon with AMX, GLO on 58 volumes, 42 iterations (an evaluation every 12) took 61 s against 67 s
in fp32 (the test suite running beside both), so the fits here are fp32.
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
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the volumes, G and the codes live there)")
    ap.add_argument("--latent-dim", type=int, default=64)
    ap.add_argument("--norm-min-group", type=int, default=2)
    ap.add_argument("--whole-stats", choices=("on", "off"), default="on", help="G^H's GroupNorm statistics")
    ap.add_argument("--sub-volume", choices=("on", "off"), default="on", help="off: G^H's whole volume each iteration")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--png-dir", default=None, help="where to render slices (default: none)")
    ap.add_argument("--batch", type=int, default=0, help="volumes per iteration, drawn at random (0: all)")
    ap.add_argument("--learn-codes", action="store_true", help="each volume's latent learnt with G (GLO)")
    ap.add_argument("--lr-codes", type=float, default=1e-2, help="Adam lr of the learnt codes")
    ap.add_argument(
        "--code-noise",
        type=float,
        default=0.0,
        help="GLO: Gaussian noise of this sd added to the drawn codes each iteration (G learns their neighbourhoods)",
    )
    ap.add_argument("--code-prior", type=float, default=1e-3, help="weight of the codes' mean squared norm's pull to 1")
    ap.add_argument(
        "--amp", choices=("on", "off"), default="off", help="on: G's forward in bf16 autocast (losses in fp32)"
    )
    ap.add_argument("--resume", action="store_true", help="start from --save's G and codes")
    ap.add_argument(
        "--save", default=None, help="write G's weights and the codes here (safetensors) at every --every and the end"
    )
    a = ap.parse_args()
    from model.data.datasets import VolumeDataset
    from model.hagan.config import HAGANConfig
    from model.hagan.networks import HAGAN

    data = VolumeDataset(a.data)
    idx = list(range(len(data))) if a.volumes == "all" else [int(i) % len(data) for i in a.volumes.split(",")]
    dev = torch.device(a.device)
    torch.backends.cudnn.benchmark = dev.type == "cuda"  # fixed shapes: let cuDNN pick its fastest kernels
    x = torch.from_numpy(np.stack([np.asarray(data.volume(i), np.float32) for i in idx]))[:, None].to(dev)
    res = x.shape[-1]
    torch.manual_seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = HAGANConfig(
        resolution=res, latent_dim=a.latent_dim, width=a.width, norm_min_group=a.norm_min_group, gh_width=a.gh_width
    )
    net = HAGAN(cfg).to(dev).train()
    net.set_mixed_layout(True)
    heads = a.lr if a.lr_heads is None else a.lr_heads
    groups = [
        {"params": list(net.ga.parameters()), "lr": a.lr},
        {"params": [*net.gl.parameters(), *net.gh.parameters()], "lr": heads},
    ]
    opt = torch.optim.Adam(groups, lr=a.lr, betas=(a.beta1, 0.999))
    z = torch.randn(len(idx), a.latent_dim, generator=torch.Generator().manual_seed(a.seed + 5)).to(dev)
    if a.learn_codes:
        z.requires_grad_(True)
        opt.add_param_group({"params": [z], "lr": a.lr_codes})
    batch = a.batch or len(idx)
    start = 1
    if a.resume:  # G and the codes from --save (Adam's moments start afresh)
        from safetensors import safe_open

        with safe_open(a.save, "pt") as f:
            net.load_state_dict({k: f.get_tensor(k).to(dev) for k in f.keys() if k != "codes"}, strict=False)
            with torch.no_grad():
                z.copy_(f.get_tensor("codes").to(dev))
            start = int(f.metadata()["iteration"]) + 1
        print(f"resumed from {a.save} at iteration {start - 1}")
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
    for it in range(start, a.iterations + 1):
        r = int(rng.integers(0, res - d + 1))
        b = np.sort(rng.choice(len(idx), batch, replace=False)) if batch < len(idx) else np.arange(len(idx))
        zb, xb, xbl = z[b], x[b], x_low[b]
        zin = zb + a.code_noise * torch.randn_like(zb) if a.code_noise > 0 else zb
        with torch.autocast(x.device.type, torch.bfloat16, enabled=a.amp == "on"):
            if a.sub_volume == "on":
                hi, lo = net.generate_train(zin, r, None, a.whole_stats == "on")
                xt = xb[:, :, r : r + d]
            else:
                f = net.features(zin)
                hi, lo, xt = net.gh(f), net.gl(f), xb
        loss = (F.l1_loss(hi.float(), xt) + F.l1_loss(lo.float(), xbl)) / 2
        if a.learn_codes:
            loss = loss + a.code_prior * (zb.square().mean(1) - 1).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it % a.every and it != a.iterations:
            continue
        net.eval()
        with torch.no_grad():
            v = torch.cat([net.gh(net.features(z[i : i + 2])) for i in range(0, len(idx), 2)])
            samples = None
            if a.learn_codes:
                samples = net.gh(net.features(_code_gaussian(z.detach().cpu(), 4, a.seed).to(dev)))
        net.train()
        full = float((v - x).abs().mean())
        print(f"| {it} | {full:.4f} | {full / median_l1:.2f} | {time.perf_counter() - t0:.0f} |", flush=True)
        if png:
            from PIL import Image

            c = res // 2
            rows = [
                np.concatenate([a_[c], a_[:, c], a_[:, :, c]] + [t[c], t[:, c], t[:, :, c]], 1)
                for a_, t in zip(v[:2, 0].cpu().numpy(), x[:2, 0].cpu().numpy(), strict=True)
            ]
            if samples is not None:  # two samples per row, beside each other
                sv = samples[:, 0].cpu().numpy()
                rows += [
                    np.concatenate([q for s_ in sv[j : j + 2] for q in (s_[c], s_[:, c], s_[:, :, c])], 1)
                    for j in (0, 2)
                ]
            img = ((np.concatenate(rows, 0) + 1) * 127.5).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(png / f"fit_{it:05d}.png")
        if a.save:
            _save(net, z, it, a.save)


def _save(net: torch.nn.Module, z: torch.Tensor, it: int, path: str) -> None:
    """G's weights (G^A, G^L, G^H, as a HAGAN state dict names them) and the codes [m, latent], atomically."""
    from safetensors.torch import save_file

    g_parts = ("ga", "gl", "gh")
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items() if k.split(".")[0] in g_parts}
    tmp = Path(path).with_suffix(".tmp")
    save_file(state | {"codes": z.detach().cpu().contiguous()}, str(tmp), metadata={"iteration": str(it)})
    tmp.replace(path)


def _code_gaussian(z: torch.Tensor, n: int, seed: int, floor: float = 0.01) -> torch.Tensor:
    """n draws from the Gaussian fitted to the codes z [m, k] (``code_gaussian``: eigenvalues floored at
    ``floor`` times their mean), what ``scripts/glo_to_model.py`` folds into the served model."""
    from model.hagan.networks import code_gaussian

    mean, root, _, _ = code_gaussian(z, floor)
    e = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed + 11), dtype=torch.float64)
    return (mean + e @ root).float()


if __name__ == "__main__":
    main()
