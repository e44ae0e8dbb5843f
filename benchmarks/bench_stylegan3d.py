"""3D-StyleGAN vs 3D Split&Shuffle-GAN: parameter counts against Liu et al. (2022) and CPU time.

    python benchmarks/bench_stylegan3d.py [--batch 2] [--repeats 3] [--shapes 32x64x64,64x64x64]
    python benchmarks/bench_stylegan3d.py --quality [--data DATASET] [--iters-2d 200] [--iters-3d 100]

Prints markdown:

1. The parameter table: G (mapping + synthesis), D and G + D of every ablation variant at 32
   channels and mapping width 64, against the paper's #param (Tables III, V, VI).
2. Time on this CPU, baseline vs Split&Shuffle, side by side, at each shape: G forward and D
   forward (no grad) of a batch, and one training iteration of ``model.stylegan3d.train.Trainer``
   (G step + D step, the lazy regularisers not due): median of ``--repeats`` runs after one
   warm-up.  Beside it, the run's first iteration (both R1 and path-length regularisation due),
   timed once and cold (no warm-up).  The data are CT phantoms prepared at 128^3 in a temporary
   folder.
3. ``--quality``: FID-free figures for the paper's claim that inflation starts 3D training from
   anatomy.  A 2D network is trained on axial slices, then two 3D runs of the same length start
   from random weights and from the Inflate-1 weights; for each, at iteration 0 and at the end,
   the MMD^2 (Gaussian kernel, one median-heuristic bandwidth over the real and all generated
   sets) between the real volumes and 32 generated ones, both 4x average-pooled, and the batch
   MMD^2 (squared distance of the mean pooled volumes).  Without ``--data``, MRI head phantoms are prepared and used.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.stylegan3d.config import StyleGAN3DConfig  # noqa: E402
from model.stylegan3d.networks import StyleGAN3D, parameter_counts  # noqa: E402

# (variant, shape, paper's #param in millions, where)
PAPER = [
    ("baseline", (32, 64, 64), 0.600, "Table III (3D-StyleGAN2)"),
    ("group-d", (32, 64, 64), 0.434, "Table III"),
    ("depthwise-d", (32, 64, 64), 0.367, "Table III"),
    ("split-shuffle-d", (32, 64, 64), 0.416, "Table III"),
    ("split", (32, 64, 64), 0.291, "Table III"),
    ("split-shuffle", (32, 64, 64), 0.291, "Table III/V"),
    ("baseline", (64, 64, 64), 0.633, "Table VI (3D-StyleGAN2)"),
    ("split-shuffle", (64, 64, 64), 0.325, "Table VI"),
]


def shape_str(s: tuple[int, ...]) -> str:
    return "x".join(map(str, s))


def config(variant: str, shape: tuple[int, int, int], **kw: Any) -> StyleGAN3DConfig:
    family = "stylegan3d" if variant == "baseline" else "splitshuffle"
    return StyleGAN3DConfig.for_variant(family, variant, shape=shape, **kw)


def parameter_table() -> str:
    rows = [
        "| variant | shape | G (mapping + synthesis) | D | G + D | paper | difference |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for variant, shape, paper, where in PAPER:
        p = parameter_counts(StyleGAN3D(config(variant, shape)))
        total = p["total_parameters"]
        diff = 100.0 * (total - paper * 1e6) / (paper * 1e6)
        rows.append(
            f"| {variant} | {shape_str(shape)} | {p['G']:,} ({p['mapping']:,} + {p['synthesis']:,}) | {p['D']:,} "
            f"| {total:,} | {paper:.3f}M ({where}) | {diff:+.2f}% |"
        )
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------- data
def phantom_dataset(root: Path, kind: str = "ct", n: int = 4, size: int = 64) -> Path:
    from model.base import Intensity
    from model.data.datasets import prepare_dataset
    from model.data.phantoms import write_phantom
    from model.hagan.config import HAGANConfig

    src = root / "src"
    for i in range(n):
        write_phantom(src / f"{kind}{i:03d}.nii.gz", kind, (size, size, size), (2.0, 2.0, 2.0), seed=i)
    out = root / "ds"
    prepare_dataset(src, out, HAGANConfig(resolution=128, modality=kind, intensity=Intensity.for_modality(kind)))
    return out


# ------------------------------------------------------------------------------------------ timing
def median_time(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def time_variant(variant: str, shape: tuple[int, int, int], data: Path, run: Path, batch: int, repeats: int) -> dict:
    from model.stylegan3d.train import Trainer

    family = "stylegan3d" if variant == "baseline" else "splitshuffle"
    opts = {"data": str(data), "output": str(run), "family": family, "variant": variant}
    opts |= {"shape": shape_str(shape), "batch": batch, "device": "cpu", "seed": 0}
    t = Trainer(opts)
    params = parameter_counts(t.net)["total_parameters"]
    z = torch.randn(batch, t.cfg.z_dim)
    with torch.no_grad():
        img = t.G(z)
        g_fwd = median_time(lambda: t.G(z), repeats)
        d_fwd = median_time(lambda: t.D(img), repeats)
    t0 = time.perf_counter()
    t.step()  # iteration 0: both lazy regularisers are due
    first = time.perf_counter() - t0
    steps = []
    for _ in range(repeats):  # iterations 1.. (not multiples of 4 or 16): G step + D step
        t0 = time.perf_counter()
        t.step()
        steps.append(time.perf_counter() - t0)
    return {"params": params, "g": g_fwd, "d": d_fwd, "step": statistics.median(steps), "reg_step": first}


def timing_table(shapes: list[tuple[int, int, int]], batch: int, repeats: int) -> str:
    rows = [
        "| shape | network | G + D params | G forward | D forward | training iteration "
        "| first iteration, R1 + PL due (1 cold sample) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        data = phantom_dataset(Path(tmp), "ct", n=2)
        for shape in shapes:
            res = {}
            for variant in ("baseline", "split-shuffle"):
                res[variant] = time_variant(variant, shape, data, Path(tmp) / f"run-{variant}", batch, repeats)
                r = res[variant]
                rows.append(
                    f"| {shape_str(shape)} | {variant} | {r['params']:,} | {r['g']:.3f} s | {r['d']:.3f} s "
                    f"| {r['step']:.2f} s | {r['reg_step']:.2f} s |"
                )
                print(f"  measured {variant} {shape_str(shape)}: {r}", file=sys.stderr, flush=True)
            b, s = res["baseline"], res["split-shuffle"]
            rows.append(
                f"| {shape_str(shape)} | split-shuffle / baseline | {s['params'] / b['params']:.3f} "
                f"| {s['g'] / b['g']:.2f} | {s['d'] / b['d']:.2f} | {s['step'] / b['step']:.2f} "
                f"| {s['reg_step'] / b['reg_step']:.2f} |"
            )
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------- quality
def pooled(v: torch.Tensor) -> torch.Tensor:
    return F.avg_pool3d(v, 4).flatten(1).double()


@torch.no_grad()
def generated(model_dir: Path, n: int = 32) -> torch.Tensor:
    from model.registry import from_pretrained

    m = from_pretrained(model_dir)
    return pooled(m.generate(m.sample_latents(n, seed=123)))


def figures(sets: dict[str, torch.Tensor], real: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per generated set: Gaussian MMD^2 to the real set with one bandwidth for the whole table
    (the median pairwise distance over the real and all generated sets, so no set saturates the
    kernel and all are measured alike), and the batch MMD^2 of 3D-StyleGAN (dot-product kernel =
    squared distance of the mean pooled volumes)."""
    from model.metrics.mmd import median_bandwidth, mmd2

    sigma = median_bandwidth(torch.cat([real, *sets.values()]))
    return {
        k: {"mmd2": mmd2(g, real, bandwidth=sigma)[0], "bmmd2": float((g.mean(0) - real.mean(0)).square().sum())}
        for k, g in sets.items()
    } | {"_sigma": {"value": sigma}}


def quality(args: argparse.Namespace) -> str:
    from model.data.datasets import VolumeDataset
    from model.data.grid import volume_to_grid
    from model.stylegan3d.train import Trainer

    shape = tuple(int(s) for s in args.shape.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = Path(args.data) if args.data else phantom_dataset(root, "mri", n=24, size=64)
        ds = VolumeDataset(data)
        vols = [torch.from_numpy(volume_to_grid(ds.volume(i), shape)) for i in range(len(ds))]
        real = pooled(torch.stack(vols)[:, None])
        common = {"data": str(data), "family": "splitshuffle", "shape": args.shape, "device": "cpu", "seed": 0}
        common |= {"channels": args.channels, "checkpoint_every": 10**9, "preview_every": 10**9, "log_every": 50}
        t0 = time.perf_counter()
        Trainer(common | {"output": str(root / "r2d"), "dims": 2, "iterations": args.iters_2d}).fit()
        t2d = time.perf_counter() - t0
        sets, secs = {}, {}
        runs = (("from scratch", {}), ("inflated (Inflate-1, G+D)", {"init_from": str(root / "r2d")}))
        for name, extra in runs:
            run = root / name.split()[0]
            Trainer(common | extra | {"output": str(run), "iterations": 0}).fit()
            sets[(name, 0)] = generated(run / "model")
            t0 = time.perf_counter()
            Trainer(common | extra | {"output": str(run), "iterations": args.iters_3d, "resume": True}).fit()
            secs[name] = time.perf_counter() - t0
            sets[(name, args.iters_3d)] = generated(run / "model")
        f = figures(sets, real)
    rows = [
        f"2D pre-training: {args.iters_2d} iterations of 16 slices in {t2d:.0f} s; 3D runs: {args.iters_3d} "
        f"iterations of batch 4; {len(ds)} real volumes on the {args.shape} grid, {args.channels} channels; "
        f"32 generated volumes per row; features: 4x average-pooled volumes; MMD^2 bandwidth "
        f"{f['_sigma']['value']:.3f} for every row.",
        "",
        "| 3D run | iteration | MMD^2 (Gaussian) to the real set | batch MMD^2 (dot product) |",
        "|---|---:|---:|---:|",
    ]
    for (name, it), r in ((k, v) for k, v in f.items() if k != "_sigma"):
        when = f"{it} ({secs[name]:.0f} s)" if it else "0"
        rows.append(f"| {name} | {when} | {r['mmd2']:.4f} | {r['bmmd2']:.2f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shapes", default="32x64x64,64x64x64")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: stable on a shared machine; 0 = torch's)"
    )
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--data", help="--quality: a prepared dataset (default: MRI phantoms)")
    ap.add_argument("--shape", default="16x32x32", help="--quality: the grid")
    ap.add_argument("--channels", type=int, default=16, help="--quality: channels")
    ap.add_argument("--iters-2d", type=int, default=200)
    ap.add_argument("--iters-3d", type=int, default=100)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("## 3D-StyleGAN / Split&Shuffle-GAN\n")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n")
    print("### Parameters (32 channels, mapping width 64; #param = G + D, as the paper counts)\n")
    print(parameter_table() + "\n", flush=True)
    if not args.skip_timing:
        shapes = [tuple(int(s) for s in x.split("x")) for x in args.shapes.split(",")]
        print(f"### CPU time, batch {args.batch}, median of {args.repeats}\n")
        print(timing_table(shapes, args.batch, args.repeats) + "\n", flush=True)  # type: ignore[arg-type]
    if args.quality:
        print("### Inflation: short 3D runs from scratch vs from inflated 2D weights\n")
        print(quality(args) + "\n", flush=True)


if __name__ == "__main__":
    main()
