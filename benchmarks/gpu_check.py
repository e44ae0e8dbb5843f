"""The GPU path in one prepared run (speed issue 17, item 6): CUDA generation checked against the
CPU's, then generation, encoding and a training iteration timed, with peak GPU memory.

    python benchmarks/gpu_check.py                      # on a CUDA machine: the whole check
    python benchmarks/gpu_check.py --device cpu --res 128 --repeats 1 --max-batch 2   # a smoke run

1. Agreement: one 256^3 volume (the authors' width, random weights, seed 0) generated on the CPU in
   fp32 and on the device in fp32 with TF32 off (bound: largest difference 1e-3 on the [-1, 1]
   scale), in fp32 with TF32 on, and in bf16 (the bounds of tests/test_precision.py: PSNR >= 40 dB
   over the [-1, 1] range, largest difference < 0.1).  A row that misses its bound says FAIL and the
   script exits 1 after the tables.
2. Generation at each --res (256 and 512 by default), fp32 and bf16: batch 1 through
   ``HAGANModel.generate`` (the served path: volume back on the host, float32), and G^A + G^H on a
   batch that stays on the device, doubled from 1 until the next doubling runs out of memory (or
   --max-batch): seconds per batch and per volume, peak device memory
   (``torch.cuda.max_memory_allocated``).
3. Encoding one volume at each --res (fp32 and bf16).
4. One training iteration at 256^3 (``model.hagan.train.Trainer``, batch 2, the authors' width, on a
   small phantom dataset written and prepared here), --amp off and on: seconds per iteration
   (median after the first) and peak device memory.

Prints markdown tables and, with --json, writes the raw figures.  Everything runs on the device named
by --device; timings synchronise the device before reading the clock.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.hagan.config import HAGANConfig  # noqa: E402
from model.hagan.model import HAGANModel  # noqa: E402

FP32_MAX_ABS = 1e-3  # CUDA fp32 (TF32 off) against the CPU: other kernels, other summation orders
BF16_MIN_PSNR_DB, BF16_MAX_ABS = 40.0, 0.1  # tests/test_precision.py's bounds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def timed(fn: Any, device: torch.device, repeats: int) -> list[float]:
    """One warm-up call, then ``repeats`` timed calls (the device synchronised around each)."""
    fn()
    out = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def compare(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a.float() - b.float()).double()
    mse = float((d**2).mean())
    return float(d.abs().max()), (10 * math.log10(4.0 / mse) if mse > 0 else float("inf"))


def agreement(device: torch.device, res: int) -> list[dict[str, Any]]:
    cfg = HAGANConfig(resolution=res, width=1.0, latent_dim=1024)
    cpu = HAGANModel.init(cfg, seed=0)
    cpu.set_precision("fp32")
    z = cpu.sample_latents(1, 0)
    ref = cpu.generate(z, mode="whole")
    dev = HAGANModel.init(cfg, seed=0, device=device)
    rows = []
    paths = (("fp32, TF32 off", "fp32", False), ("fp32, TF32 on", "fp32", True), ("bf16", "bf16", False))
    for name, precision, tf32 in paths:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        dev.set_precision(precision)
        v = dev.generate(z, mode="whole", budget_mb=1 << 20)
        mx, psnr = compare(v, ref)
        if precision == "bf16":
            ok = psnr >= BF16_MIN_PSNR_DB and mx < BF16_MAX_ABS
            bound = f"PSNR >= {BF16_MIN_PSNR_DB:g} dB, max < {BF16_MAX_ABS:g}"
        elif tf32:
            ok, bound = True, "reported only (TF32 rounds inputs to 10 bits)"
        else:
            ok, bound = mx <= FP32_MAX_ABS, f"max <= {FP32_MAX_ABS:g}"
        rows.append({"res": res, "path": name, "max_abs": mx, "psnr_db": psnr, "bound": bound, "ok": ok})
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return rows


def generation(device: torch.device, res: int, repeats: int, max_batch: int) -> list[dict[str, Any]]:
    m = HAGANModel.init(HAGANConfig(resolution=res, width=1.0, latent_dim=1024), seed=0, device=device)
    rows = []
    for precision in ("fp32", "bf16"):
        m.set_precision(precision)
        z = m.sample_latents(1, 0)
        reset_peak(device)
        t = timed(lambda: m.generate(z, mode="whole", budget_mb=1 << 20), device, repeats)  # noqa: B023
        s = statistics.median(t)
        rows.append({"res": res, "precision": precision, "batch": 1, "path": "generate (to host)",
                     "s": s, "s_per_volume": s, "peak_gib": peak_gib(device)})  # fmt: skip
        b, best = 1, None
        while b <= max_batch:
            zb = m.sample_latents(b, 1)
            reset_peak(device)
            try:
                with torch.inference_mode():
                    t = timed(lambda: m._gh_whole(m.features(zb)), device, repeats)  # noqa: B023
            except torch.cuda.OutOfMemoryError:
                break
            s = statistics.median(t)
            best = {"res": res, "precision": precision, "batch": b, "path": "G^A + G^H on the device",
                    "s": s, "s_per_volume": s / b, "peak_gib": peak_gib(device)}  # fmt: skip
            b *= 2
        if best is not None:
            rows.append(best)
        reset_peak(device)
    return rows


def encoding(device: torch.device, res: int, repeats: int) -> list[dict[str, Any]]:
    m = HAGANModel.init(HAGANConfig(resolution=res, width=1.0, latent_dim=1024), seed=0, device=device)
    x = torch.rand(1, 1, res, res, res) * 2 - 1
    rows = []
    for precision in ("fp32", "bf16"):
        m.set_precision(precision)
        reset_peak(device)
        t = timed(lambda: m.encode(x), device, repeats)
        rows.append({"res": res, "precision": precision, "s": statistics.median(t), "peak_gib": peak_gib(device)})
    return rows


def training(device: torch.device, res: int, iterations: int) -> list[dict[str, Any]]:
    from model.data.datasets import prepare_dataset
    from model.data.phantoms import write_phantom
    from model.hagan.train import Trainer

    rows = []
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "src"
        for i in range(4):
            write_phantom(src / f"p{i}.nii.gz", "ct", shape=(96, 96, 96), spacing=(2.5, 2.5, 2.5), seed=i)
        prepare_dataset(src, Path(d) / "ds", HAGANConfig(resolution=res))
        for amp in ("off", "on"):
            if amp == "on" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
                continue
            opts = {"data": str(Path(d) / "ds"), "output": str(Path(d) / f"run-{amp}"), "iterations": iterations,
                    "batch": 2, "width": 1.0, "latent_dim": 1024, "device": str(device), "seed": 0, "amp": amp,
                    "checkpoint_every": 10**6, "preview_every": 10**6}  # fmt: skip
            t = Trainer(opts)
            times = []
            reset_peak(device)
            for _ in range(iterations):
                sync(device)
                s = time.perf_counter()
                t.step()
                sync(device)
                times.append(time.perf_counter() - s)
            rows.append({"res": res, "amp": amp, "s_per_iteration": statistics.median(times[1:] or times),
                         "peak_gib": peak_gib(device)})  # fmt: skip
    return rows


def table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--res", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--train-res", type=int, default=256)
    ap.add_argument("--train-iterations", type=int, default=6)
    ap.add_argument("--skip", nargs="*", default=[], choices=["agreement", "generation", "encoding", "training"])
    ap.add_argument("--json", help="also write the raw figures here")
    a = ap.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available on this machine (use --device cpu for a smoke run)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {name}, torch {torch.__version__}\n")
    out: dict[str, Any] = {"device": name, "torch": torch.__version__}
    if "agreement" not in a.skip:
        out["agreement"] = agreement(device, min(a.res))
        print(f"## Agreement with the CPU ({min(a.res)}^3, seed 0)\n")
        print(table(out["agreement"], ["res", "path", "max_abs", "psnr_db", "bound", "ok"]) + "\n")
    if "generation" not in a.skip:
        out["generation"] = [r for res in a.res for r in generation(device, res, a.repeats, a.max_batch)]
        print("## Generation\n")
        print(table(out["generation"], ["res", "precision", "path", "batch", "s", "s_per_volume", "peak_gib"]) + "\n")
    if "encoding" not in a.skip:
        out["encoding"] = [r for res in a.res for r in encoding(device, res, a.repeats)]
        print("## Encoding (one volume)\n")
        print(table(out["encoding"], ["res", "precision", "s", "peak_gib"]) + "\n")
    if "training" not in a.skip:
        out["training"] = training(device, a.train_res, a.train_iterations)
        print(f"## Training iteration ({a.train_res}^3, batch 2, the authors' width)\n")
        print(table(out["training"], ["res", "amp", "s_per_iteration", "peak_gib"]) + "\n")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    failed = [r for r in out.get("agreement", []) if not r["ok"]]
    for r in failed:
        print(f"FAIL: {r['path']} at {r['res']}^3: max {r['max_abs']:.3g}, PSNR {r['psnr_db']:.1f} dB ({r['bound']})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
