"""`voxgen fit-direction` and `voxgen traverse` (registered into model/cli.py)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class _Scans:
    """Model-space volumes for ``fit-direction --source encode``, read one at a time (never all in
    memory): a prepared dataset (``manifest.json``, from ``voxgen prepare``) or a folder of scans
    (NIfTI, NRRD, MHA, DICOM series folders; searched recursively).  Unreadable scans are skipped
    with a note on stderr."""

    def __init__(self, folder: str, config: Any) -> None:
        from model.data.datasets import VolumeDataset, find_scans

        self.config = config
        root = Path(folder)
        if not root.is_dir():
            raise SystemExit(f"voxgen fit-direction: {folder} is not a folder")
        self.dataset = None
        self.files: list[Path] = []
        if (root / "manifest.json").is_file():
            try:
                ds = VolumeDataset(root)
            except (ValueError, KeyError, OSError) as e:
                raise SystemExit(f"voxgen fit-direction: {folder}: unreadable dataset ({e})") from e
            m, r = ds.manifest, config.cube().resolution  # the cube the model's training data were prepared on
            if ds.resolution != r or m.get("modality", config.modality) != config.modality:
                raise SystemExit(
                    f"voxgen fit-direction: {folder} was prepared for {m.get('modality')} at {ds.resolution}^3; "
                    f"this model is {config.modality} at {r}^3 (prepare the scans again for it)"
                )
            want = config.to_dict()["intensity"]
            if "intensity" in m and (m["intensity"]["lo"], m["intensity"]["hi"]) != (want["lo"], want["hi"]):
                raise SystemExit(
                    f"voxgen fit-direction: {folder} was normalised with intensity {m['intensity']}, "
                    f"this model uses {want} (prepare the scans again for it)"
                )
            self.dataset = ds
        else:
            self.files = find_scans(root)
        if len(self) < 4:
            raise SystemExit(f"voxgen fit-direction: {folder} holds {len(self)} scans; at least 4 are needed")

    def __len__(self) -> int:
        return len(self.dataset) if self.dataset is not None else len(self.files)

    def __iter__(self) -> Iterator[Any]:
        import numpy as np

        from model.data.volumes import VolumeError, load_for_model

        if self.dataset is not None:
            for i in range(len(self.dataset)):
                yield np.asarray(self.dataset.volume(i), np.float32)
            return
        for p in self.files:
            try:
                yield load_for_model(p, self.config)
            except VolumeError as e:
                sys.stderr.write(f"\nvoxgen fit-direction: skipping {p}: {e}\n")


def cmd_fit_direction(a: argparse.Namespace) -> int:
    from model.cli import _load, _progress_printer
    from model.latent.directions import fit_direction, save_direction

    m = _load(a)
    volumes = None
    if a.source == "encode":
        if not a.data:
            raise SystemExit("voxgen fit-direction: --source encode needs --data FOLDER (scans or a prepared dataset)")
        volumes = _Scans(a.data, m.config)
    elif a.data:
        raise SystemExit("voxgen fit-direction: --data is for --source encode")
    if a.steps is not None and a.source != "encode":
        raise SystemExit("voxgen fit-direction: --steps is for --source encode")
    if a.n < 2:
        raise SystemExit("voxgen fit-direction: --n must be at least 2")
    try:
        d = fit_direction(
            m,
            a.attribute,
            name=a.name,
            n=a.n,
            seed=a.seed,
            volumes=volumes,
            ridge=a.ridge,
            progress=_progress_printer("fit-direction"),
            encode_steps=a.steps,
        )
    except ValueError as e:
        raise SystemExit(f"voxgen fit-direction: {e}") from e
    save_direction(a.model, d)
    print(json.dumps({"name": d.name, **d.meta()}, indent=2))
    return 0


def _parse_steps(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError as e:
        raise SystemExit(f"voxgen traverse: --steps takes comma-separated numbers, e.g. -2,0,2 ({e})") from e


STEP_EXTENSIONS = {"nifti": ".nii.gz", "npy": ".npy", "nrrd": ".nrrd", "mha": ".mha"}


def cmd_traverse(a: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from model.cli import _label_index, _load, _progress_printer
    from model.data.export import DicomWriter, VolumeSource
    from model.data.volumes import write_volume
    from model.latent.directions import load_directions, measure_model_volume, traverse

    if (a.steps is None) == (a.target is None):
        raise SystemExit("voxgen traverse: give either --steps a,b,c or --target V")
    if (a.seed is None) == (a.latent is None):
        raise SystemExit("voxgen traverse: give either --seed S or --latent z.npy")
    m = _load(a)
    label = _label_index(m, a.label)
    dirs = load_directions(a.model)
    if a.direction not in dirs:
        raise SystemExit(f"voxgen traverse: no direction {a.direction!r}; stored: {', '.join(dirs) or 'none'}")
    d = dirs[a.direction]
    if a.latent:
        z = np.load(a.latent, allow_pickle=False).astype(np.float32)
        if z.size != m.latent_dim:
            raise SystemExit(
                f"voxgen traverse: {a.latent} holds {z.size} values; this model's latent has {m.latent_dim}"
            )
        z0 = torch.from_numpy(z).reshape(1, -1)
    else:
        z0 = m.sample_latents(1, a.seed)
    report = _progress_printer("traverse")

    def measure(z: torch.Tensor) -> float:  # the target's refinement: generate and measure, as reported below
        with torch.no_grad():
            return measure_model_volume(m.generate(z, label)[0, 0].cpu().numpy(), m.config, d.attribute)

    try:
        steps = _parse_steps(a.steps) if a.steps else None
        rows = traverse(m, z0, d, steps=steps, target=a.target, n_steps=a.n_steps, measure=measure, refine=a.refine)
    except ValueError as e:
        raise SystemExit(f"voxgen traverse: {e}") from e
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(a.model).resolve().name
    dicom = DicomWriter(m.config, f"SYNTHETIC voxgen {name} traverse") if a.format == "dicom" else None
    for i, row in enumerate(rows):
        with torch.no_grad():
            v = m.generate(row["latent"], label)[0, 0].cpu().numpy()
        src = VolumeSource(name, a.seed if a.latent is None else None, i, len(rows), "step")
        if dicom is not None:  # one series folder per step: OUT_DIR/step_00/, ...
            info = dicom.write_folder(out / f"step_{i:02d}", v, src)
            row["file"], row["series_uid"] = f"step_{i:02d}/", info["series_uid"]
        else:
            row["file"] = f"step_{i:02d}{STEP_EXTENSIONS[a.format]}"
            write_volume(out / row["file"], v, m.config, source=src)
        row["measured"] = measure_model_volume(v, m.config, d.attribute)
        row["latent"] = row["latent"][0].tolist()
        report(i + 1, len(rows), "generate")
    refine = rows[-1].pop("refine", None)
    doc = {"direction": d.name, "attribute": d.attribute, "r2": d.r2, "r2_cv": d.r2_cv, "steps": rows}
    if refine is not None:
        doc["refine"] = refine
    tmp = out / ".steps.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out / "steps.json")
    for i, r in enumerate(rows):
        print(f"step {i}: alpha {r['alpha']:+.3f}  predicted {r['predicted']:.3f}  measured {r['measured']:.3f}")
    return 0


def register(sub: argparse._SubParsersAction, commands: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    from model.cli import precision_arg
    from model.latent import REFINE_ROUNDS
    from model.latent.attributes import ATTRIBUTES

    s = sub.add_parser(
        "fit-direction",
        help="learn a latent direction for an attribute; stored in the model's directions.safetensors",
        epilog="attributes: " + "; ".join(f"{k}: {v.description}" for k, v in ATTRIBUTES.items()),
    )
    s.add_argument("--model", required=True)
    s.add_argument("--device", default="auto")
    s.add_argument("--attribute", required=True, choices=sorted(ATTRIBUTES))
    s.add_argument("--name", help="name to store it under (default: the attribute)")
    s.add_argument("--n", type=int, default=64, help="sampled volumes (--source sample)")
    s.add_argument("--seed", type=int, default=0, help="seed of the sampled latents (--source sample)")
    s.add_argument("--source", choices=["sample", "encode"], default="sample")
    s.add_argument("--data", help="--source encode: a folder of scans, or a dataset prepared by voxgen prepare")
    s.add_argument("--ridge", type=float, default=1.0, help="ridge penalty of the linear fit")
    s.add_argument(
        "--steps",
        type=int,
        help="--source encode: each scan's latent fitted by N steps after the encoder, as encode --steps (default: "
        "the model's encode_steps)",
    )
    commands["fit-direction"] = cmd_fit_direction

    s = sub.add_parser("traverse", help="volumes along a stored latent direction")
    s.add_argument("--model", required=True)
    s.add_argument("--device", default="auto")
    precision_arg(s)
    s.add_argument("--direction", required=True)
    s.add_argument("--seed", type=int)
    s.add_argument("--latent", help="a .npy latent (e.g. latent.npy from encode)")
    s.add_argument(
        "--steps",
        help="comma-separated alphas (distances along the unit direction); --steps=-2,0,2 when one leads with -",
    )
    s.add_argument("--target", type=float, help="attribute value to reach")
    s.add_argument("--label", help="class name or index a class-conditional model generates (POST /traverse label)")
    s.add_argument("--n-steps", type=int, default=5, help="steps from the start to the target (--target)")
    s.add_argument(
        "--refine",
        type=int,
        default=REFINE_ROUNDS,
        help="with --target: at most this many extra volumes generated and measured to correct the direction's "
        "linear step, so the measured attribute ends at the target (0: the linear step alone)",
    )
    s.add_argument(
        "--format",
        choices=["nifti", "nrrd", "mha", "npy", "dicom"],
        default="nifti",
        help="per step: step_00.nii.gz (default), .nrrd, .mha, .npy, or a DICOM series folder step_00/",
    )
    s.add_argument("-o", "--output", required=True, help="output folder")
    commands["traverse"] = cmd_traverse
