"""`voxgen fit-direction` and `voxgen traverse` (registered into model/cli.py)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path


def cmd_fit_direction(a: argparse.Namespace) -> int:
    from model.cli import _load, _progress_printer
    from model.latent.directions import fit_direction, save_direction

    m = _load(a)
    volumes = None
    if a.source == "encode":
        if not a.data:
            raise SystemExit("voxgen fit-direction: --source encode needs --data FOLDER of scans")
        from model.data.volumes import load_for_model

        files = sorted(p for p in Path(a.data).iterdir() if p.name.endswith((".nii.gz", ".nii", ".nrrd", ".mha")))
        if len(files) < 4:
            raise SystemExit(f"voxgen fit-direction: {a.data} holds {len(files)} scans; at least 4 are needed")
        volumes = [load_for_model(p, m.config) for p in files]
    d = fit_direction(
        m, a.attribute, name=a.name, n=a.n, seed=a.seed, volumes=volumes, progress=_progress_printer("fit-direction")
    )
    save_direction(a.model, d)
    print(json.dumps({"name": d.name, **d.meta()}, indent=2))
    return 0


def cmd_traverse(a: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from model.cli import _load, _progress_printer
    from model.data.volumes import write_volume
    from model.latent.directions import load_directions, measure_attribute, traverse

    m = _load(a)
    dirs = load_directions(a.model)
    if a.direction not in dirs:
        raise SystemExit(f"voxgen traverse: no direction {a.direction!r}; stored: {', '.join(dirs) or 'none'}")
    d = dirs[a.direction]
    if a.latent:
        z0 = torch.from_numpy(np.load(a.latent, allow_pickle=False).astype(np.float32)).reshape(1, -1)
    elif a.seed is not None:
        z0 = m.sample_latents(1, a.seed)
    else:
        raise SystemExit("voxgen traverse: give --seed S or --latent z.npy")
    steps = [float(s) for s in a.steps.split(",")] if a.steps else None
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    rows = traverse(m, z0, d, steps=steps, target=a.target, n_steps=a.n_steps)
    report = _progress_printer("traverse")
    for i, row in enumerate(rows):
        v = m.generate(row["latent"])[0, 0].numpy()
        write_volume(out / f"step_{i:02d}.nii.gz", v, m.config)
        row["measured"] = measure_attribute(m.config.intensity.to_physical(v), m.config.spacing, d.attribute)
        row["latent"] = row["latent"][0].tolist()
        report(i + 1, len(rows), "generate")
    (out / "steps.json").write_text(
        json.dumps({"direction": d.name, "attribute": d.attribute, "steps": rows}, indent=1)
    )
    for i, r in enumerate(rows):
        print(f"step {i}: alpha {r['alpha']:+.3f}  predicted {r['predicted']:.2f}  measured {r['measured']:.2f}")
    return 0


def register(sub: argparse._SubParsersAction, commands: dict[str, Callable]) -> None:
    from model.latent.directions import ATTRIBUTES

    s = sub.add_parser("fit-direction", help="learn a latent direction for an attribute; stored in the model")
    s.add_argument("--model", required=True)
    s.add_argument("--device", default="auto")
    s.add_argument("--attribute", required=True, choices=sorted(ATTRIBUTES))
    s.add_argument("--name", help="name to store it under (default: the attribute)")
    s.add_argument("--n", type=int, default=64, help="sampled volumes (--source sample)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--source", choices=["sample", "encode"], default="sample")
    s.add_argument("--data", help="folder of scans (--source encode)")
    commands["fit-direction"] = cmd_fit_direction

    s = sub.add_parser("traverse", help="volumes along a stored latent direction")
    s.add_argument("--model", required=True)
    s.add_argument("--device", default="auto")
    s.add_argument("--direction", required=True)
    s.add_argument("--seed", type=int)
    s.add_argument("--latent")
    s.add_argument("--steps", help="comma-separated alphas")
    s.add_argument("--target", type=float, help="attribute value to reach")
    s.add_argument("--n-steps", type=int, default=5)
    s.add_argument("-o", "--output", required=True, help="output folder")
    commands["traverse"] = cmd_traverse
