"""Train every model family on the same prepared dataset with the same CPU-time budget, evaluate
each with ``voxgen evaluate``'s code on one common grid, and print a Markdown table.

    python benchmarks/compare_families.py --data DATASET -o OUT --budget-s 3600 \\
        [--families hagan,splitshuffle,stylegan3d,alphawgan] [--n 64] [--grid 64] \\
        [--reference models/demo-brain-mri] [--threads 2] [--set alphawgan.width=0.5 ...]

Budget: CPU seconds of this process (``time.process_time``: every thread counts) spent inside the
family's trainer, including its start-up and checkpoints.  A run is trained in chunks and resumed
(resume is exact for every family that supports it) until the budget is spent, so each family
stops within about one chunk of the same budget; the table shows the CPU seconds each actually
used.  Families whose trainer is not in this version are listed as not available.

Grid: the volumes are compared on one grid (default 64^3: the native output of alpha-WGAN-GP and of
the Split&Shuffle paper's ADNI setting; HA-GAN's smallest output, 128^3, is area-averaged to it),
so that every family is measured on the same voxels.  Per-family training settings are CPU-sized
defaults (``FAMILY_OPTIONS``), printed with the table; change them with ``--set family.key=value``.

Outputs in OUT: runs/<family>/ (training runs), eval/<family>/ (each evaluate report),
embedding_all.png (PCA of the primary features of the real set and of every family, with fitted
2-sigma ellipses, as the HA-GAN paper's Fig. 4), results.json and table.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import families  # noqa: E402
from model.metrics.evaluate import evaluate  # noqa: E402
from model.training import trainer_module  # noqa: E402

FAMILIES = families.NAMES
FAMILY_OPTIONS: dict[str, dict[str, Any]] = {
    "hagan": {"width": 0.25, "latent_dim": 64, "batch": 2},  # the shipped demo model's CPU setting
    "splitshuffle": {"shape": "64x64x64"},
    "stylegan3d": {"shape": "64x64x64"},
    "alphawgan": {"width": 0.25, "latent_dim": 1000, "batch": 4},
}


def _parse_sets(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for it in items:
        key, _, val = it.partition("=")
        fam, _, opt = key.partition(".")
        if not opt or fam not in FAMILIES:
            raise SystemExit(f"--set expects family.key=value with family in {FAMILIES}, got {it!r}")
        try:
            v: Any = json.loads(val)
        except json.JSONDecodeError:
            v = val
        out.setdefault(fam, {})[opt] = v
    return out


def train_with_budget(family: str, options: dict[str, Any], budget_s: float, first_chunk: int = 1) -> dict[str, Any]:
    """Train ``family`` until ``budget_s`` CPU seconds are spent; resumes the run chunk by chunk."""
    try:
        trainer = trainer_module(family)
    except ValueError as e:
        return {"status": f"not available: {e}"}
    used, wall, done, target = 0.0, 0.0, 0, first_chunk
    model_dir = None
    while True:
        opts = options | {"family": family, "iterations": target, "resume": done > 0}
        c0, w0 = time.process_time(), time.perf_counter()
        model_dir = trainer.train(opts, None)
        used += time.process_time() - c0
        wall += time.perf_counter() - w0
        done = target
        per_iter = used / done
        left = budget_s - used
        if left < 0.5 * per_iter:
            break
        # aim at the budget; at most double per chunk so a slow start does not overshoot
        target = done + max(1, min(done * 2, int(left / per_iter)))
    return {"status": "ok", "iterations": done, "cpu_s": used, "wall_s": wall, "model": str(model_dir)}


def _params(model_dir: str) -> int | None:
    from model.registry import from_pretrained

    info = from_pretrained(model_dir).info()
    return info.get("parameters", {}).get("total_parameters")


def _row(fam: str, res: dict[str, Any], rep: dict[str, Any] | None, extra: str | None) -> str:
    """One table row; ``extra`` names a further feature set (reference encoder, MedicalNet) or None."""
    n_metric = 7 + (1 if extra else 0)
    if rep is None:
        return f"| {fam} | - | - | - | - | {res['status']} |" + " - |" * (n_metric - 1)
    mt, d = rep["metrics"], rep["distances"]

    def f(v: Any) -> str:
        return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    h = rep["headline"]
    cells = [
        fam,
        f(res.get("params")),
        f(res["iterations"]),
        f"{res['cpu_s']:.0f}",
        "x".join(map(str, rep["model"]["output_shape"])),
        f"{f(h['value'])} ({f(h['z'])} sd)",
        f(d["texture"]["kid"]),
        f(d["pooled8"]["fd"]),
    ]
    if extra:
        cells += [f(d[extra]["fd"])]
    cells += [
        f(mt["slicewise"]["average"]["fd"]),
        f(rep["diversity"]["ms_ssim_generated"]),
        f((mt["reconstruction"] or {}).get("ratio_to_constant")),
        "; ".join(w.split(":")[0] for w in rep["warnings"]) or "-",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a prepared dataset (voxgen prepare)")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--budget-s", type=float, default=3600.0, help="CPU seconds of training per family")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--n", type=int, default=64, help="generated volumes per family")
    ap.add_argument("--n-real", type=int, help="real volumes (default: all)")
    ap.add_argument("--grid", type=int, default=64, help="common evaluation grid (cube side)")
    ap.add_argument("--batch", type=int, default=8, help="evaluate's chunk size (bMMD^2 batch, MS-SSIM pairs)")
    ap.add_argument("--reference", help="a trained hagan/alphawgan model directory: its encoder gives 3D features")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="family.key=value training option (JSON value)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    overrides = _parse_sets(a.set)
    families = [f for f in a.families.split(",") if f]
    grid = (a.grid, a.grid, a.grid)
    results: dict[str, Any] = {}
    reports: dict[str, dict[str, Any]] = {}
    for fam in families:
        opts = FAMILY_OPTIONS.get(fam, {}) | overrides.get(fam, {})
        base = {"data": a.data, "output": str(out / "runs" / fam), "device": "cpu", "seed": a.seed}
        base |= {"checkpoint_every": 10**9, "preview_every": 10**9}  # each chunk's end still checkpoints
        print(f"[{fam}] training for {a.budget_s:.0f} CPU s with {opts}", file=sys.stderr)
        res = train_with_budget(fam, base | opts, a.budget_s)
        res["options"] = opts
        if res["status"] == "ok":
            res["params"] = _params(res["model"])
            print(f"[{fam}] {res['iterations']} iterations, {res['cpu_s']:.0f} CPU s; evaluating", file=sys.stderr)
            rep = evaluate(
                res["model"],
                a.data,
                out / "eval" / fam,
                n=a.n,
                n_real=a.n_real,
                seed=a.seed,
                batch=a.batch,
                grid=grid,
                reference=a.reference,
                device="cpu",
            )
            reports[fam] = rep
        results[fam] = res
    primary = next(iter(reports.values()))["primary_features"] if reports else None
    extra = next(
        (k for k in next(iter(reports.values()))["features"] if k.startswith(("encoder-", "medicalnet"))), None
    )
    head = "| family | parameters | iterations | CPU s | output | fd_texture (z) | KID texture | FD pooled8 |"
    if extra:
        head += f" FD {extra} |"
    head += " slice FD avg | MS-SSIM gen | recon MAE / constant | warnings |"
    lines = [
        f"Same data (`{a.data}`), {a.budget_s:.0f} CPU s of training per family ({a.threads} threads), "
        f"evaluated on a {a.grid}^3 grid with n = {a.n} generated volumes (seed {a.seed}).",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for fam in families:
        lines.append(_row(fam, results[fam], reports.get(fam), extra))
    if reports:
        any_rep = next(iter(reports.values()))
        fl, d = any_rep["floor"], any_rep["diversity"]
        lines += [
            "",
            f"Real-vs-real floor of fd_texture at {fl['n']} vs {fl['n']}: {fl['mean']:.4g} +- {fl['sd']:.4g} "
            f"({fl['splits']} random splits of {any_rep['real']['n']} real volumes); MS-SSIM among real volumes "
            f"{(d['ms_ssim_real'] or float('nan')):.4g}.",
            "",
            "Training options: " + "; ".join(f"{f}: {results[f]['options']}" for f in families),
        ]
        _joint_embedding(out, reports, primary)
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    (out / "results.json").write_text(json.dumps({"families": results, "args": vars(a)}, indent=1, default=str))
    print(table)


def _joint_embedding(out: Path, reports: dict[str, dict[str, Any]], primary: str | None) -> None:
    from model.metrics.plots import embedding_plot, pca_2d

    groups: dict[str, np.ndarray] = {}
    for fam in reports:
        with np.load(out / "eval" / fam / "features.npz", allow_pickle=False) as z:
            if "real" not in groups:
                groups["real"] = z[f"real/{primary}"]
            groups[fam] = z[f"generated/{primary}"]
    pts, expl = pca_2d(groups)
    embedding_plot(
        pts,
        out / "embedding_all.png",
        title=f"PCA of {primary} features, every family",
        axis_labels=(f"PC1 ({100 * expl[0]:.0f}%)", f"PC2 ({100 * expl[1]:.0f}%)"),
    )


if __name__ == "__main__":
    main()
