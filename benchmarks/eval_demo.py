"""Score models and known-good / known-bad volume sets with one instrument (``voxgen evaluate``'s
code, one configuration for every row), against one real set, and print a Markdown table.

    python benchmarks/eval_demo.py --real /tmp/heldout-ds --model models/demo-brain-mri \\
        [--model OTHER ...] [--untrained] [--independent /tmp/other-ds] [--n 16] [--grid R] \\
        [--ms-ssim-pairs K] -o OUT

Rows:
* each ``--model`` (and with ``--untrained`` the first model's network with fresh weights, seed 0);
* ``--independent``: a prepared dataset of other real volumes, scored as they are (what a perfect
  model would score), and its degradations (model/metrics/calibration.py): blurred by sigma 1 and 2
  voxels, 2x blocky, intensity-shifted, collapsed (every volume the first).  The degradations act
  on the model-space volumes at the dataset's resolution, before the evaluation's resampling.

Every row is ``evaluate(..., n, grid, batch, seed)`` with the same real set, feature sets, kernels
and floor; the real set should hold at least 2n volumes so the floor is taken at n vs n.
Reports go to OUT/<row>/ and the table to OUT/table.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.data.datasets import VolumeDataset  # noqa: E402
from model.metrics.calibration import KINDS, degrade  # noqa: E402
from model.metrics.evaluate import evaluate  # noqa: E402


def _write_samples(vols: torch.Tensor, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, v in enumerate(vols):
        np.save(folder / f"{i:03d}.npy", v[0].numpy())
    return folder


def _row(name: str, r: dict[str, Any]) -> str:
    h, d, dv = r["headline"], r["distances"], r["diversity"]

    def f(v: Any) -> str:
        return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    warn = "; ".join(w.split(":")[0] for w in r["warnings"] if "real set has" not in w) or "-"
    rec = (r["metrics"].get("reconstruction") or {}).get("ratio_to_constant")
    return (
        f"| {name} | {f(h['value'])} | {f(h['z'])} | {f(d['texture']['kid'])} +- {f(d['texture']['kid_sd'])} | "
        f"{f(d['pooled8']['fd'])} | {f(r['metrics']['slicewise']['average']['fd'])} | "
        f"{f(dv['ms_ssim_generated'])} / {f(dv['ms_ssim_real'])} | {f(dv['pooled_spread_ratio'])} | {f(rec)} | {warn} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", required=True, help="prepared dataset of the real volumes to score against")
    ap.add_argument("--model", action="append", default=[], help="model directory (repeatable)")
    ap.add_argument("--untrained", action="store_true", help="also the first model's network, untrained")
    ap.add_argument("--independent", help="prepared dataset of other real volumes (a perfect model's row)")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument(
        "--grid", type=int, help="evaluation grid (cube side; default: the real set's, the models' native grid)"
    )
    ap.add_argument("--ms-ssim-pairs", type=int, help="MS-SSIM pairs per chunk (default: all)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--encode-steps",
        type=int,
        help="latent-fit steps after the encoder for the models' reconstruction column (default: each model's own)",
    )
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.output)
    grid = a.grid or VolumeDataset(a.real).resolution
    kw = {"n": a.n, "grid": (grid,) * 3, "batch": a.batch, "seed": a.seed, "device": "cpu"}
    kw["ms_ssim_pairs"] = a.ms_ssim_pairs
    rows: dict[str, dict[str, Any]] = {}
    mkw = kw | {"encode_steps": a.encode_steps}
    for m in a.model:
        rows[Path(m).name] = evaluate(m, a.real, out / Path(m).name, **mkw)
    if a.untrained and a.model:
        from model.registry import from_pretrained

        first = from_pretrained(a.model[0])
        fresh = type(first).init(first.config, seed=0)
        rows["untrained (same network)"] = evaluate(fresh, a.real, out / "untrained", **mkw)
    if a.independent:
        ds = VolumeDataset(a.independent)
        idx = np.random.default_rng(a.seed).permutation(len(ds))[: a.n]
        vols = torch.from_numpy(np.stack([np.asarray(ds.volume(int(i)), np.float32) for i in idx]))[:, None]
        sets = {"independent real": vols} | {k: degrade(vols, k) for k in KINDS}
        for name, v in sets.items():
            folder = _write_samples(v, out / "samples" / name.replace(" ", "_"))
            rows[name] = evaluate(None, a.real, out / name.replace(" ", "_"), samples=folder, **kw)
    any_r = next(iter(rows.values()))
    fl = any_r["floor"]
    lines = [
        f"Scored against `{a.real}` ({any_r['real']['n']} real volumes), n = {a.n} per row, {grid}^3 grid, "
        f"seed {a.seed}; floor of fd_texture at {fl['n']} vs {fl['n']}: {fl['mean']:.4g} +- {fl['sd']:.4g} "
        f"({fl['splits']} random splits).",
        "",
        "| scored set | fd_texture | z (floor sd) | KID texture | FD pooled8 | slice FD avg | MS-SSIM scored / real "
        "| anatomy spread | recon MAE / constant | warnings |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(k, r) for k, r in rows.items()]
    table = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table)
    (out / "rows.json").write_text(
        json.dumps({k: {"headline": r["headline"], "floor": r["floor"]} for k, r in rows.items()})
    )
    print(table)


if __name__ == "__main__":
    main()
