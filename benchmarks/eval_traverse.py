"""Does `traverse --target` reach its target? The measured attribute along the steps, for several seeds.

A direction is fitted as `voxgen fit-direction` fits it (``--n`` samples from ``--fit-seed``,
ridge regression latent -> attribute), kept in memory.  The training range is the attribute over
those samples.  For each seed 0..``--seeds``-1 the target is the other quartile of that range
(the 75th percentile for a start below the median, else the 25th), so it lies inside the range.
Each step of ``traverse(..., target=T, n_steps=N, refine=R)`` is generated and measured, as `voxgen
traverse` writes and the API reports them (``--refine`` R, default 3 as theirs: the linear step
corrected by up to R volumes generated and measured; 0: the linear step alone).  Per seed it prints
the measured values, whether they move monotonically towards the target, and the end's error
relative to the target's value and to the distance asked for (|end - target| / |target - start|).
Where the attribute varies little between samples, 10% of the target's value can exceed its whole
range; the distance is the strict figure.

    python benchmarks/eval_traverse.py --model models/demo-brain-mri --attribute brain_tissue_ml \\
        [--n 128] [--seeds 8] [--n-steps 5] [--refine 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--attribute", default="brain_tissue_ml")
    ap.add_argument("--n", type=int, default=128, help="samples the direction is fitted on")
    ap.add_argument("--fit-seed", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--n-steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--refine", type=int, default=3, help="as `voxgen traverse --refine` (0: the linear step)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from model.latent.directions import fit_values, measure_model_volume, traverse
    from model.registry import from_pretrained

    m = from_pretrained(a.model)
    z_fit = m.sample_latents(a.n, a.fit_seed)
    values = []
    for i in range(a.n):
        with torch.no_grad():
            values.append(measure_model_volume(m.generate(z_fit[i : i + 1])[0, 0].numpy(), m.config, a.attribute))
    d = fit_values(z_fit, values, a.attribute, source=f"sample seed={a.fit_seed}")  # as fit-direction fits
    q25, q50, q75 = np.percentile(values, [25, 50, 75])
    print(
        f"model {a.model}: {a.attribute} over {a.n} samples: min {min(values):.1f}, quartiles {q25:.1f} / "
        f"{q50:.1f} / {q75:.1f}, max {max(values):.1f}; direction R^2 {d.r2:.2f}"
        + (f", 5-fold R^2 {d.r2_cv:.2f}" if d.r2_cv is not None else "")
    )
    print("| seed | start | target | measured along the steps | monotonic | end error / target | / distance |")
    print("|---|---|---|---|---|---|---|")
    hits = hits_d = mono = extra = 0
    for seed in range(a.seeds):
        z0 = m.sample_latents(1, seed)
        with torch.no_grad():
            start = measure_model_volume(m.generate(z0)[0, 0].numpy(), m.config, a.attribute)
        target = float(q75 if start < q50 else q25)

        def measure(z: torch.Tensor) -> float:
            with torch.no_grad():
                return measure_model_volume(m.generate(z)[0, 0].numpy(), m.config, a.attribute)

        rows = traverse(m, z0, d, target=target, n_steps=a.n_steps, measure=measure, refine=a.refine)
        extra += max(0, len(rows[-1].get("refine", {}).get("tried", [])) - 1)  # the start is generated anyway
        meas = []
        for r in rows:
            with torch.no_grad():
                meas.append(measure_model_volume(m.generate(r["latent"])[0, 0].numpy(), m.config, a.attribute))
        steps = np.diff(meas) * np.sign(target - start)
        is_mono = bool(np.all(steps > 0))
        err_t = abs(meas[-1] - target) / abs(target)
        err_d = abs(meas[-1] - target) / max(abs(target - start), 1e-9)
        mono += is_mono
        hits += err_t <= 0.10
        hits_d += err_d <= 0.10
        path = " -> ".join(f"{v:.0f}" for v in meas)
        print(f"| {seed} | {start:.1f} | {target:.1f} | {path} | {is_mono} | {err_t:.3f} | {err_d:.2f} |")
    print(
        f"monotonic: {mono}/{a.seeds}; end within 10% of the target's value: {hits}/{a.seeds}; "
        f"within 10% of the distance asked for: {hits_d}/{a.seeds}; refine {a.refine}: {extra / a.seeds:.1f} "
        "extra volumes per traverse"
    )


if __name__ == "__main__":
    main()
