"""G^A batched over samples against one sample at a time (speed issue 17, item 2): whether the
features of a batch equal those made sample by sample, bit for bit, and the time of each, side by
side in one process.  Random weights at the authors' full width, latent 1024.

    python benchmarks/bench_batch_ga.py                  # 128 and 256, fp32 and bf16 where native
    python benchmarks/bench_batch_ga.py --res 256 --n 4

Batching G^A would read its weights (the first linear layer alone is 134 MB at full width) once per
request instead of once per volume, but a seed's volume must not depend on how many volumes were
asked for with it: the table says whether that holds on this CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service import cpu_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, nargs="*", default=[128, 256])
    ap.add_argument("--n", type=int, default=3, help="volumes per request")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    import torch

    from model.hagan.config import HAGANConfig
    from model.hagan.model import HAGANModel
    from model.precision import resolve_precision

    precisions = ["fp32"] + (["bf16"] if resolve_precision("auto", torch.device("cpu")) == "bf16" else [])
    threads = torch.get_num_threads()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} CPUs, {threads} threads; n = {a.n}, best of {a.repeats}\n")
    print("| grid | precision | batched == one by one | largest difference | G^A batched (s) | G^A one by one (s) |")
    print("|---|---|---|---|---|---|")
    for res in a.res:
        m = HAGANModel.init(HAGANConfig(resolution=res), seed=0)
        z = m.sample_latents(a.n, 0)
        for p in precisions:
            m.set_precision(p)
            m.features(z[:1])  # folds the weights once
            together = m.features(z)
            alone = torch.cat([m.features(z[i : i + 1]) for i in range(a.n)])
            tb, to = [], []
            for _ in range(a.repeats):
                t = time.perf_counter()
                m.features(z)
                tb.append(time.perf_counter() - t)
                t = time.perf_counter()
                for i in range(a.n):
                    m.features(z[i : i + 1])
                to.append(time.perf_counter() - t)
            diff = float((together.float() - alone.float()).abs().max())
            print(f"| {res}^3 | {p} | {torch.equal(together, alone)} | {diff:.3g} | {min(tb):.3f} | {min(to):.3f} |")


if __name__ == "__main__":
    main()
