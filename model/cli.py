"""The ``voxgen`` command line.  One sub-command per verb; heavy imports happen inside each verb
so ``voxgen --help`` and the API-only verbs start fast."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model import families
from model.labels import LabelError, label_index
from model.latent import MAX_FIT_STEPS, fit_steps_problem

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def _progress_printer(prefix: str) -> Callable[[int, int, str], None]:
    """A terminal progress line: done/total, stage, elapsed (stderr, so stdout stays clean)."""
    t0 = time.perf_counter()

    def report(done: int, total: int, stage: str) -> None:
        pct = 100.0 * done / max(total, 1)
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\r{prefix}: {stage} {done}/{total} ({pct:5.1f}%) {time.perf_counter() - t0:6.1f}s{end}")
        sys.stderr.flush()

    return report


# ------------------------------------------------------------------------------------- init / info
def cmd_init(a: argparse.Namespace) -> int:
    import torch  # noqa: F401

    return families.get(a.family).init_function()(a)


def cmd_info(a: argparse.Namespace) -> int:
    from model.registry import from_pretrained

    m = from_pretrained(a.model)
    info = m.info()
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    cfg = info["config"]
    print(f"{a.model}: family {cfg['family']}")
    for k, v in cfg.items():
        if k != "family":
            print(f"  {k}: {v}")
    print("parameters:")
    for k, v in info["parameters"].items():
        print(f"  {k:>16}: {v:,}")
    return 0


# --------------------------------------------------------------------------------- generate & co
def precision_arg(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default=None,
        help="generation arithmetic: auto = bf16 on CPUs with AVX-512 BF16 or AMX (HA-GAN), else fp32 "
        "(default: $VOXGEN_PRECISION, else auto)",
    )


def _load(a: argparse.Namespace):
    from model.registry import from_pretrained, resolve_device

    m = from_pretrained(a.model, device=resolve_device(a.device), serving=True)
    m.set_precision(getattr(a, "precision", "fp32") or _settings().precision)
    return m


def _settings():  # noqa: ANN202
    """The VOXGEN_* settings (worker/settings.py): the defaults of --precision and --budget-mb."""
    from worker.settings import Settings

    return Settings()


def _label_index(model, label: str | None) -> int | None:
    """``--label`` as the networks take it (model/labels.py, the one resolver); exits with its message."""
    try:
        return label_index(model.class_names, label)
    except LabelError as e:
        raise SystemExit(f"voxgen: {e} (--label)") from None


def _numbered(path: Path, i: int, n: int) -> Path:
    if n == 1:
        return path
    name = path.name
    from model.data.volumes import WRITE_SUFFIXES

    for ext in WRITE_SUFFIXES:
        if name.endswith(ext):
            return path.with_name(f"{name[: -len(ext)]}_{i:03d}{ext}")
    return path.with_name(f"{name}_{i:03d}")


def cmd_generate(a: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from model.data.export import DicomWriter, DicomZip, VolumeSource
    from model.data.volumes import WRITE_SUFFIXES, _suffix, write_volume

    if dicom_output(a.output) is None and _suffix(Path(a.output)) not in WRITE_SUFFIXES:
        raise SystemExit(
            f"voxgen generate: cannot write {a.output!r}; give -o x.nii.gz | x.nii | x.nrrd | x.mha | x.npy, "
            "or DIR/ or x.zip for DICOM series"
        )
    m = _load(a)
    if a.latent:
        z = np.load(a.latent, allow_pickle=False)
        z = torch.from_numpy(np.asarray(z, dtype=np.float32)).reshape(-1, m.latent_dim)
        how = f"latent from {a.latent}"
    else:
        if a.seed is None:
            raise SystemExit("voxgen generate: give --seed S or --latent z.npy")
        z = m.sample_latents(a.n, a.seed)
        how = f"seed {a.seed}"
    label = _label_index(m, a.label)
    print(
        f"model {a.model} ({m.family}, {'x'.join(map(str, m.output_shape))}, {m.modality}), {how}, device {m.device}",
        file=sys.stderr,
    )
    budget = a.budget_mb or _settings().memory_budget_mb
    vols = m.generate(z, label, mode=a.mode, budget_mb=budget, progress=_progress_printer("generate"))
    out, n = Path(a.output), vols.shape[0]
    name = Path(a.model).resolve().name
    seed = None if a.latent else a.seed
    sources = [VolumeSource(name, seed, i, n) for i in range(n)]
    if dicom_output(a.output) == "zip":  # one zip, one series folder per volume
        with DicomZip(out, m.config, f"SYNTHETIC voxgen {name} volumes") as dz:
            for i in range(n):
                dz.add(f"volume_{i:03d}", vols[i, 0].numpy(), sources[i])
        for s in dz.series:
            print(f"{out}:{s['folder']}/ (series {s['series_uid']})")
        return 0
    if dicom_output(a.output) == "folder":  # one series folder per volume under DIR
        w = DicomWriter(m.config, f"SYNTHETIC voxgen {name} volumes")
        for i in range(n):
            s = w.write_folder(out / f"volume_{i:03d}", vols[i, 0].numpy(), sources[i])
            print(f"{out / s['folder']}/ (series {s['series_uid']})")
        return 0
    for i in range(n):
        p = _numbered(out, i, n)
        write_volume(p, vols[i, 0].numpy(), m.config, source=sources[i])
        print(p)
    return 0


def dicom_output(output: str) -> str | None:
    """``zip`` for ``-o x.zip``, ``folder`` for ``-o DIR/`` (a trailing slash, or an existing
    folder): DICOM series out; None for a file name (its extension picks the format)."""
    if output.lower().endswith(".zip"):
        return "zip"
    if output.endswith(("/", os.sep)) or Path(output).is_dir():
        return "folder"
    return None


def _read_scan(m, path: str, series_uid: str | None = None):
    import torch

    from model.data.volumes import load_for_model

    v = load_for_model(path, m.config, series_uid=series_uid)
    return torch.from_numpy(v)[None, None]


def _encode_kw(m: Any, a: argparse.Namespace, label: int | None) -> dict[str, Any]:
    """``encode``'s keywords: ``--steps`` (checked) and the class a conditional model's fit generates."""
    kw: dict[str, Any] = {}
    if a.steps is not None:  # (None: the model's default)
        if problem := fit_steps_problem(a.steps, m.family, families.get(m.family).encoder == "projection"):
            raise SystemExit(f"voxgen: --{problem}")
        kw["steps"] = a.steps
    if label is not None:  # (only HA-GAN models have classes)
        kw["label"] = label
    return kw


def _encode(m: Any, x: Any, kw: dict[str, Any]) -> Any:
    """``m.encode`` with the CLI's progress; its refusals (a conditional model's fit without --label) as messages."""
    try:
        return m.encode(x, progress=_progress_printer("encode"), **kw)
    except ValueError as e:
        raise SystemExit(f"voxgen: {e}") from None


def cmd_encode(a: argparse.Namespace) -> int:
    import numpy as np

    m = _load(a)
    x = _read_scan(m, a.scan, a.series_uid)
    label = _label_index(m, a.label) if a.label is not None else None  # (the encoder alone needs none)
    z = _encode(m, x, _encode_kw(m, a, label)).numpy()
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, z.astype(np.float32))
    print(out)
    return 0


def cmd_reconstruct(a: argparse.Namespace) -> int:
    import torch

    from model.data.volumes import (
        INPUT_SPACE_SUFFIXES,
        WRITE_SUFFIXES,
        _suffix,
        load_for_model,
        write_in_input_space,
        write_volume,
    )

    # the output's format is checked before any work (it failed after encoding and generating before)
    ext = _suffix(Path(a.output))
    space = a.space or ("model" if ext == ".npy" else "input")
    if ext not in WRITE_SUFFIXES:
        raise SystemExit(
            f"voxgen reconstruct: cannot write {a.output!r}; give -o x.nii.gz | x.nii | x.nrrd | x.mha | x.npy"
        )
    if space == "input" and ext not in INPUT_SPACE_SUFFIXES:
        raise SystemExit(
            f"voxgen reconstruct: --space input writes .nii.gz or .nii, not {a.output!r} "
            "(with --space model: .nii.gz, .nii, .nrrd, .mha or .npy)"
        )
    m = _load(a)
    info: dict = {}
    x = torch.from_numpy(load_for_model(a.scan, m.config, info=info, series_uid=a.series_uid))[None, None]
    label = _label_index(m, a.label)
    z = _encode(m, x, _encode_kw(m, a, label))
    v = m.generate(z, label, progress=_progress_printer("generate"))
    if space == "input":  # the scan's own grid and affine: it overlays the scan in world space
        write_in_input_space(Path(a.output), v[0, 0].numpy(), m.config, info)
    else:
        write_volume(Path(a.output), v[0, 0].numpy(), m.config)
    print(a.output)
    return 0


def cmd_import_hagan(a: argparse.Namespace) -> int:
    from model.hagan.convert import import_authors_checkpoints

    out = import_authors_checkpoints(
        g=a.G,
        e=a.E,
        sub_e=a.sub_e,
        d=a.D,
        modality=a.modality,
        resolution=a.resolution,
        latent_dim=a.latent_dim,
        class_names=[c for c in (a.classes or "").split(",") if c],
        output=a.output,
    )
    print(f"converted the authors' checkpoints into {out}")
    return 0


# ------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="voxgen", description="High-resolution 3D medical image generation")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("init", help="write a freshly initialised model directory")
    s.add_argument("--family", default="hagan", choices=families.NAMES)
    s.add_argument("--resolution", type=int, default=256, choices=[128, 256, 512])
    s.add_argument("--latent-dim", type=int, default=None, help="default: hagan 1024, alphawgan 1000")
    s.add_argument("--width", type=float, default=1.0, help="channel-width multiplier (1 = the authors' widths)")
    s.add_argument("--classes", help="comma-separated class names for a class-conditional model")
    s.add_argument("--modality", choices=["ct", "mri"], default="ct")
    s.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), help="voxel size in mm")
    s.add_argument("--shape", help="splitshuffle/stylegan3d: volume grid DxHxW (default 32x64x64)")
    s.add_argument(
        "--variant",
        choices=["baseline", "split-shuffle", "split", "split-shuffle-d", "group-d", "depthwise-d"],
        help="splitshuffle/stylegan3d: the paper's architecture variant (default: the family's own)",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-o", "--output", required=True)
    COMMANDS["init"] = cmd_init

    s = sub.add_parser("info", help="a model's config and parameter counts")
    s.add_argument("model")
    s.add_argument("--json", action="store_true")
    COMMANDS["info"] = cmd_info

    def model_args(s: argparse.ArgumentParser) -> None:
        s.add_argument("--model", required=True, help="model directory")
        s.add_argument("--device", default="auto", help="cpu, cuda, cuda:0 (default: cuda if available)")
        precision_arg(s)

    s = sub.add_parser(
        "generate",
        help="generate volumes (.nii.gz, .nrrd or .mha in physical units, DICOM series in DIR/ or x.zip, or raw .npy)",
    )
    model_args(s)
    s.add_argument("--seed", type=int)
    s.add_argument("--n", type=int, default=1)
    s.add_argument("--latent", help="a .npy of shape [n, latent_dim] or [latent_dim]")
    s.add_argument("--label", help="class name or index (class-conditional models)")
    s.add_argument("--mode", choices=["auto", "whole", "slab"], default="auto")
    s.add_argument(
        "--budget-mb",
        type=int,
        default=None,
        help="memory budget for G^H: above it, slabs (default: $VOXGEN_MEMORY_BUDGET_MB, else 1024)",
    )
    s.add_argument(
        "-o",
        "--output",
        required=True,
        help="x.nii.gz / x.nii / x.nrrd / x.mha (physical units), x.npy (model space), DIR/ (one DICOM series "
        "folder per volume: DIR/volume_000/, ...) or x.zip (the same folders in a zip)",
    )
    COMMANDS["generate"] = cmd_generate

    def scan_args(s: argparse.ArgumentParser) -> None:
        s.add_argument("scan", help="a NIfTI/NRRD/MHA file, or a folder or .zip of DICOM files (any names)")
        s.add_argument(
            "--series-uid",
            metavar="UID",
            help="the SeriesInstanceUID of the series to read from a DICOM folder or zip holding several",
        )

    def steps_arg(s: argparse.ArgumentParser) -> None:
        s.add_argument(
            "--steps",
            type=int,
            help="hagan, alphawgan: Adam steps fitting the encoder's latent to the scan (G frozen; 0: the encoder "
            f"alone; at most {MAX_FIT_STEPS}; default: the model's encode_steps, 0 unless its config sets it); "
            "splitshuffle, stylegan3d: projection steps (default: the model's projection_steps)",
        )

    s = sub.add_parser("encode", help="encode a scan to a latent code (.npy)")
    model_args(s)
    scan_args(s)
    steps_arg(s)
    s.add_argument("--label", help="a class-conditional model with --steps: the class its fit generates")
    s.add_argument("-o", "--output", required=True)
    COMMANDS["encode"] = cmd_encode

    s = sub.add_parser("reconstruct", help="encode a scan and generate it back")
    model_args(s)
    scan_args(s)
    steps_arg(s)
    s.add_argument("--label")
    s.add_argument(
        "--space",
        choices=["input", "model"],
        help="input (default for .nii/.nii.gz): on the scan's own grid and affine; model (default for .npy): the "
        "model's grid",
    )
    s.add_argument("-o", "--output", required=True)
    COMMANDS["reconstruct"] = cmd_reconstruct

    s = sub.add_parser("import-hagan", help="convert the authors' HA-GAN .pth checkpoints into a model directory")
    s.add_argument("--G", required=True)
    s.add_argument("--E", required=True)
    s.add_argument("--sub-e", required=True)
    s.add_argument("--D")
    s.add_argument("--modality", choices=["ct", "mri"], required=True)
    s.add_argument("--resolution", type=int, choices=[128, 256], default=None, help="default: inferred")
    s.add_argument("--latent-dim", type=int, default=None, help="default: inferred")
    s.add_argument("--classes")
    s.add_argument("-o", "--output", required=True)
    COMMANDS["import-hagan"] = cmd_import_hagan

    # verbs of the service and training live beside their code and register themselves here
    for register in _extensions():
        register(sub, COMMANDS)
    return p


def _extensions() -> list[Callable]:
    """Sub-command modules: each has ``register(subparsers, commands)``; missing ones are skipped."""
    import importlib

    found = []
    for name in ("model.cli_train", "model.cli_service", "model.cli_latent", "model.cli_eval"):
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        found.append(mod.register)
    return found


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:
        print(f"voxgen {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
