"""Generation and encoding: time and peak RSS, ours beside the plain (authors') inference path.

Each cell runs in a fresh subprocess so its peak RSS (ru_maxrss, whole process: Python, torch,
the weights and the work) is its own.  Random weights at the authors' full width, latent 1024.

    python benchmarks/bench_generate.py                 # 128, 256, 512; prints a Markdown table
    python benchmarks/bench_generate.py --res 256 --repeats 3

Paths:
  plain   the authors' eval-mode Generator on the whole volume (explicit nearest upsampling, then
          3x3x3 convs; only G's weights in memory, as their code loads it)
  whole   voxgen: G^H on the whole feature map, folded upsample-convs, channels-last, chunked
  slab    voxgen: memory-bounded slabs with global GroupNorm statistics (budget --slab-mb)
  whole-bf16, slab-bf16
          the same in bf16 (``set_precision("bf16")``: weights converted once, activations bf16,
          GroupNorm statistics fp32/fp64); run where the CPU has native bf16 (AVX-512 BF16 or AMX),
          or with --bf16 anywhere (on AVX2-only CPUs it is tens of times slower)
Encoding: E^H on the 8 slabs + E^G, the authors' functional path vs ours (the same arithmetic);
encode-bf16: ours under bf16 autocast (``set_precision("bf16")``), where bf16 is native or --bf16.
encode-fit: ours (fp32) with the latent then fitted by --fit-steps steps (``encode(x, steps=K)``,
model/latent/fit.py); only with --paths encode-fit (each step generates forward and backward).
voxgen cells hold the whole model (G, D, E^H, E^G) as a served model directory does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mib, run_in_child  # noqa: E402


def one(res: int, path: str, repeats: int, slab_mb: int, fit_steps: int = 2) -> dict:
    import torch

    from model.hagan.config import HAGANConfig
    from model.hagan.model import HAGANModel
    from model.hagan.reference import authors_encode, authors_generate

    torch.manual_seed(0)
    m = HAGANModel.init(HAGANConfig(resolution=res), seed=0)
    z = m.sample_latents(1, 0)
    times = []
    if path == "plain":
        g = {}
        # the authors' G state dict (their key names), and nothing else in memory
        names = {"ga.fc": "fc1"} | {f"ga.convs.{i}": f"tp_conv{i + 1}" for i in range(5)}
        names |= {f"ga.norms.{i}": f"bn{i + 1}" for i in range(5)} | {"gh.convs.0": "tp_conv6", "gh.norms.0": "bn6"}
        names |= {"gh.convs.1": "tp_conv7"}
        for k, v in m.net.state_dict().items():
            mod, prm = k.rsplit(".", 1)
            if mod in names:
                g[f"{names[mod]}.{prm}"] = v.clone()
        del m
        import gc

        gc.collect()
        for _ in range(repeats):
            t = time.perf_counter()
            authors_generate(g, z, res)
            times.append(time.perf_counter() - t)
    elif path in ("whole", "slab", "whole-bf16", "slab-bf16"):
        m.set_precision("bf16" if path.endswith("-bf16") else "fp32")
        for _ in range(repeats):
            t = time.perf_counter()
            m.generate(z, mode=path.removesuffix("-bf16"), budget_mb=slab_mb)
            times.append(time.perf_counter() - t)
    elif path in ("encode-plain", "encode", "encode-bf16", "encode-fit"):
        x = torch.rand(1, 1, res, res, res) * 2 - 1
        if path != "encode-plain":
            m.set_precision("bf16" if path == "encode-bf16" else "fp32")
            steps = fit_steps if path == "encode-fit" else 0
            for _ in range(repeats):
                t = time.perf_counter()
                m.encode(x, steps=steps)
                times.append(time.perf_counter() - t)
        else:
            sd = m.net.state_dict()
            e = {
                k.replace("eh.convs.", "conv").replace("eh.norms.", "bn"): v
                for k, v in sd.items()
                if k.startswith("eh.")
            }
            e = {_renumber(k): v for k, v in e.items()}
            se = _sub_e_keys(sd, res)
            del m
            for _ in range(repeats):
                t = time.perf_counter()
                authors_encode(e, se, x)
                times.append(time.perf_counter() - t)
    return {"res": res, "path": path, "times": times, "peak_rss_mib": peak_rss_mib()}


def _renumber(k: str) -> str:
    # eh.convs.0 -> conv1 etc. (after the replace above: conv0.weight -> conv1.weight)
    head, prm = k.split(".", 1)
    base = head.rstrip("0123456789")
    return f"{base}{int(head[len(base) :]) + 1}.{prm}"


def _sub_e_keys(sd: dict, res: int) -> dict:
    first = 1 if res != 128 else 2
    out = {}
    for k, v in sd.items():
        if not k.startswith("eg."):
            continue
        parts = k.split(".")
        if parts[1] == "out":
            n = 5
            out[f"conv{n}.{parts[2]}"] = v
        else:
            n = int(parts[2]) + first
            out[f"{'conv' if parts[1] == 'convs' else 'bn'}{n}.{parts[3]}"] = v
    return out


def run_cell(res: int, path: str, repeats: int, slab_mb: int, fit_steps: int = 2) -> dict:
    cmd = [sys.executable, __file__, "--one", str(res), path, "--repeats", str(repeats), "--slab-mb", str(slab_mb)]
    cmd += ["--fit-steps", str(fit_steps)]
    return run_in_child(cmd, res, path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, nargs="*", default=[128, 256, 512])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slab-mb", type=int, default=256, help="memory budget of the slab path")
    ap.add_argument("--one", nargs=2, metavar=("RES", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--paths", nargs="*", help="only these paths (default: all that apply)")
    ap.add_argument("--bf16", action="store_true", help="add the bf16 paths even where the CPU has no native bf16")
    ap.add_argument("--fit-steps", type=int, default=2, help="encode-fit: latent-fit steps after the encoder")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(int(a.one[0]), a.one[1], a.repeats, a.slab_mb, a.fit_steps)))
        return
    import torch

    from model.precision import cpu_has_bf16

    bf16 = a.bf16 or cpu_has_bf16()
    print(
        f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {cpu_has_bf16()}; "
        f"{a.repeats} runs per cell\n"
    )
    rows = []
    for res in a.res:
        paths = ["plain", "whole", "slab", "encode-plain", "encode"]
        if res == 512:
            paths = ["whole", "slab", "encode"]  # the plain path needs > 20 GiB at 512^3 (not run)
        if bf16:
            paths[paths.index("slab") + 1 : paths.index("slab") + 1] = ["whole-bf16", "slab-bf16"]
            paths.append("encode-bf16")
        if a.paths:
            paths = [p for p in paths if p in a.paths] + (["encode-fit"] if "encode-fit" in a.paths else [])
        for path in paths:
            r = run_cell(res, path, a.repeats, a.slab_mb, a.fit_steps)
            rows.append(r)
            print(f"  done {res} {path}", file=sys.stderr)
    print("| output | path | time, median (min) s | peak RSS GiB |")
    print("|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['res']}^3 | {r['path']} | failed: {r['error']} | |")
            continue
        ts = sorted(r["times"])
        med = ts[len(ts) // 2]
        print(f"| {r['res']}^3 | {r['path']} | {med:.2f} ({ts[0]:.2f}) | {r['peak_rss_mib'] / 1024:.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
