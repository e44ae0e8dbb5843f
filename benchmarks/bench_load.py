"""Process start to first volume: what a fresh serving process (a worker, `voxgen generate`) pays
before its first result, loading the whole model directory against a serving load (G^A and G^H
only: no discriminators, no G^L, the encoders on first use).

    python benchmarks/bench_load.py --res 256 --repeats 3

Each run is a fresh Python process that imports voxgen, loads the model directory, generates one
volume (seed 0) and encodes it; it reports its phases and its own peak RSS.  The two loads
alternate, so both see the same machine.  Random weights at the authors' full width (latent 1024)
unless --width.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_model_args  # noqa: E402
from bench_service import cpu_model  # noqa: E402

_CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
import torch
from model.registry import from_pretrained
t1 = time.perf_counter()
m = from_pretrained(sys.argv[1], serving=sys.argv[2] == "serving")
m.set_precision("fp32")
t2 = time.perf_counter()
v = m.generate(m.sample_latents(1, 0))
t3 = time.perf_counter()
rss_gen = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
m.encode(v)
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "generate_s": t3 - t2, "encode_s": t4 - t3,
    "peak_to_first_volume_mib": rss_gen, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_args(ap)
    a = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    print(f"CPU: {cpu_model()}, {os.cpu_count()} CPUs, torch threads default; {a.res}^3, width {a.width}, "
          f"latent {a.latent_dim}; medians of {a.repeats} fresh processes each, alternated\n")  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        model = Path(d) / "m"
        subprocess.run(
            [sys.executable, "-m", "model.cli", "init", "--family", "hagan", "--resolution", str(a.res), "--width",
             str(a.width), "--latent-dim", str(a.latent_dim), "--modality", "ct", "--seed", "0", "-o", str(model)],
            check=True, capture_output=True, cwd=root,
        )  # fmt: skip
        runs: dict[str, list[dict]] = {"whole": [], "serving": []}
        for _ in range(a.repeats):
            for how in runs:
                t = time.perf_counter()
                cmd = [sys.executable, "-c", _CHILD, str(model), how]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=root)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                r["start_to_first_volume_s"] = time.perf_counter() - t - r["encode_s"]
                runs[how].append(r)
    keys = ("start_to_first_volume_s", "import_s", "load_s", "generate_s", "encode_s", "peak_to_first_volume_mib",
            "peak_mib")  # fmt: skip
    print("| load | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for how, rs in runs.items():
        med = [statistics.median(r[k] for r in rs) for k in keys]
        cells = (f"{v:.2f}" if k.endswith("_s") else f"{v:.0f}" for k, v in zip(keys, med, strict=True))
        print(f"| {how} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
