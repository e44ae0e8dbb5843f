"""HA-GAN training: time and peak memory of one iteration, ours beside the authors' arithmetic.

One iteration = the paper's four updates (D^H + D^L, G, E^H, E^G) on a batch, as `voxgen train`
runs it (model/hagan/train.py).  Each cell runs in a fresh subprocess so its peak memory is its own:
peak RSS on the CPU (ru_maxrss: Python, torch, weights, Adam state and the work), peak allocated
GPU memory on CUDA.  Random weights at the authors' full width (latent 1024), a synthetic CT
dataset (phantoms) prepared at the resolution.

    python benchmarks/bench_train.py                       # 128 and 256, batch 2; Markdown tables
    python benchmarks/bench_train.py --res 256 --iterations 3 --device cuda
    python benchmarks/bench_train.py --res 128 --rounds 3 --ablation   # what each speed-up gives

Paths:
  plain  the authors' arithmetic: x2 nearest upsample, then a 3x3x3 conv (G^A, G^H), fp32, the
         standard (contiguous) layout, PyTorch's default Adam, glibc's default allocator
  voxgen the trainer's defaults:
         - fused_upconv: each upsample + conv as one stride-2 transposed conv with derived 4x4x4
           weights (exact, about 3x fewer multiply-adds; backward keeps the small input)
         - channels_last (CPU): channels-last 3D inputs on grids of >= 16^3 voxels, the standard
           layout on smaller ones (same values up to summation order)
         - fused_adam: Adam's fused kernel (same update rule)
         - (tune_malloc, glibc: large blocks from the reusable heap; off by default, an --ablation row)
         - amp (CUDA): bf16 autocast
  --ablation adds "voxgen, X off" cells (voxgen with one speed-up turned off) and "voxgen, tune_malloc on".
Every path frees each group's gradients right after its optimizer step.
The first iteration of each cell is a warm-up and not counted.  CPU time (all threads of the process)
is printed beside wall time: on a shared machine it is the fairer comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mib, run_in_child  # noqa: E402

# the trainer's speed-ups, all off for the authors' arithmetic, all on (their defaults) for voxgen
SPEEDUPS = ("fused_upconv", "channels_last", "fused_adam", "tune_malloc", "amp")
PATHS: dict[str, dict[str, str | bool]] = {
    "plain": {k: (False if k == "fused_upconv" else "off") for k in SPEEDUPS},
    "voxgen": {k: (True if k == "fused_upconv" else "auto") for k in SPEEDUPS} | {"tune_malloc": "off"},
}
# --ablation: voxgen with one speed-up off at a time, and with the optional malloc tuning on
for _k in ("fused_upconv", "channels_last", "fused_adam"):
    PATHS[f"voxgen, {_k} off"] = PATHS["voxgen"] | {_k: PATHS["plain"][_k]}
PATHS["voxgen, tune_malloc on"] = PATHS["voxgen"] | {"tune_malloc": "on"}
# --amp-cpu (or where the CPU has native bf16, AVX-512 BF16 or AMX): voxgen with bf16 autocast on the CPU
PATHS["voxgen, bf16 autocast"] = PATHS["voxgen"] | {"amp": "on"}
PATHS_DEFAULT = ("plain", "voxgen", "voxgen, bf16 autocast")  # without --ablation


def make_dataset(res: int, root: Path, n: int = 4) -> Path:
    from model.data.datasets import prepare_dataset
    from model.data.phantoms import write_phantom
    from model.hagan.config import HAGANConfig

    out = root / f"ds{res}"
    if (out / "manifest.json").is_file():
        return out
    src = root / f"src{res}"
    src.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_phantom(src / f"p{i}.nii.gz", "ct", shape=(res // 2, res // 2, res // 2), seed=i)
    prepare_dataset(src, out, HAGANConfig(resolution=res))
    return out


def one(res: int, path: str, data: str, batch: int, iterations: int, device: str, model: dict | None = None) -> dict:
    import torch

    from model.hagan.train import Trainer

    with tempfile.TemporaryDirectory() as run:
        opts = {"data": data, "output": run, "resolution": res, "batch": batch, "device": device, "seed": 0}
        opts |= model or {}  # --width, --latent-dim, --recipe (default: the authors' width and recipe)
        speedups = PATHS[path]
        t = Trainer(opts | {k: v for k, v in speedups.items() if k != "fused_upconv"})
        t.net.set_fused_upconv(speedups["fused_upconv"] is True)
        cuda = t.device.type == "cuda"
        t.step()  # warm-up
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times, cpu = [], []
        for _ in range(iterations):
            s, c = time.perf_counter(), time.process_time()
            losses = t.step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - s)
            cpu.append(time.process_time() - c)
        params = sum(p.numel() for p in t.net.parameters())
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mib()
    return {
        "res": res,
        "path": path,
        "batch": batch,
        "times": times,
        "cpu_times": cpu,
        "peak_mib": peak,
        "memory": "GPU allocated" if cuda else "RSS",
        "params": params,
        "losses_finite": all(v == v for v in losses.values()),
        "amp": str(t.amp_dtype) if t.amp_dtype is not None else "off",
    }


def run_cell(res: int, path: str, data: Path, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--one", str(res), path, str(data)]
    cmd += ["--batch", str(a.batch), "--iterations", str(a.iterations), "--device", a.device]
    cmd += ["--width", str(a.width), "--latent-dim", str(a.latent_dim), "--recipe", a.recipe]
    cmd += ["--sub-volumes", str(a.sub_volumes)]
    return run_in_child(cmd, res, path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, nargs="*", default=[128, 256])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=2, help="timed iterations per cell (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=1, help="run every cell this many times, alternating the paths")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", help="folder for the synthetic datasets (default: a temporary one)")
    ap.add_argument("--one", nargs=3, metavar=("RES", "PATH", "DATA"), help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--ablation", action="store_true", help="also run voxgen with each speed-up off in turn")
    ap.add_argument("--width", type=float, default=1.0, help="channel width multiplier (1.0: the authors')")
    ap.add_argument("--latent-dim", type=int, default=1024)
    ap.add_argument("--recipe", choices=["authors", "small-data"], default="authors")
    ap.add_argument("--sub-volumes", type=int, default=1, help="high-resolution sub-volumes per iteration")
    ap.add_argument(
        "--amp-cpu",
        action="store_true",
        help="also run voxgen with bf16 autocast on the CPU (on by default where the CPU has native bf16)",
    )
    a = ap.parse_args()
    if a.one:
        model = {"width": a.width, "latent_dim": a.latent_dim, "recipe": a.recipe, "monitor_every": 0}
        model["sub_volumes"] = a.sub_volumes
        r = one(int(a.one[0]), a.one[1], a.one[2], a.batch, a.iterations, a.device, model)
        print(json.dumps(r))
        return
    import torch

    from model.precision import cpu_has_bf16

    amp_cpu = a.device == "cpu" and (a.amp_cpu or cpu_has_bf16())
    chosen = [p for p in (PATHS if a.ablation else PATHS_DEFAULT) if amp_cpu or p != "voxgen, bf16 autocast"]
    print(
        f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {a.device}; width {a.width}, latent {a.latent_dim}, recipe "
        f"{a.recipe}; sub-volumes {a.sub_volumes}; batch {a.batch}; {a.rounds} round(s) of "
        f"{a.iterations} timed iterations per cell; peak memory: the largest of the rounds\n"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        for res in a.res:
            data = make_dataset(res, work)
            cells: dict[str, dict] = {}
            # rounds alternate the paths, so slow drifts of a shared machine reach all of them alike
            for k in range(a.rounds):
                for path in chosen:
                    r = run_cell(res, path, data, a)
                    print(f"  done {res} {path} round {k + 1}/{a.rounds}", file=sys.stderr)
                    c = cells.setdefault(path, r)
                    if "error" in r or "error" in c:
                        cells[path] = c if "error" in c else r
                    elif c is not r:
                        c["times"] += r["times"]
                        c["cpu_times"] += r["cpu_times"]
                        c["peak_mib"] = max(c["peak_mib"], r["peak_mib"])
            rows += cells.values()
    print("| output | path | s / iteration, median (min) | CPU s / iteration | peak memory GiB | parameters |")
    print("|---|---|---|---|---|---|")
    by = {}
    for r in rows:
        if "error" in r:
            print(f"| {r['res']}^3 | {r['path']} | failed: {r['error']} | | |")
            continue
        ts, cs = sorted(r["times"]), sorted(r["cpu_times"])
        r["median"], r["cpu_median"] = statistics.median(ts), statistics.median(cs)
        by[(r["res"], r["path"])] = r
        mem = f"{r['peak_mib'] / 1024:.2f} ({r['memory']})"
        cells = f"{r['median']:.2f} ({ts[0]:.2f}) | {r['cpu_median']:.1f} | {mem} | {r['params'] / 1e6:.1f}M"
        print(f"| {r['res']}^3 | {r['path']} | {cells} |")
    print("\n| output | path | / plain: wall time (median) | wall time (fastest) | CPU time (median) | peak memory |")
    print("|---|---|---|---|---|---|")
    for res in a.res:
        p = by.get((res, "plain"))
        for path in [k for k in PATHS if k != "plain"]:
            v = by.get((res, path))
            if not (p and v):
                continue
            ratios = (
                v["median"] / p["median"],
                min(v["times"]) / min(p["times"]),
                v["cpu_median"] / p["cpu_median"],
                v["peak_mib"] / p["peak_mib"],
            )
            print(f"| {res}^3 | {path} | " + " | ".join(f"{x:.2f}" for x in ratios) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
