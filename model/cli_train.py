"""`voxgen prepare` and `voxgen train` (registered into model/cli.py)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable


def cmd_prepare(a: argparse.Namespace) -> int:
    from model.cli import _progress_printer
    from model.data.datasets import prepare_dataset
    from model.hagan.config import HAGANConfig, Intensity

    cfg = HAGANConfig(resolution=a.resolution, modality=a.modality, intensity=Intensity.for_modality(a.modality))
    report = prepare_dataset(a.src, a.output, cfg, labels_csv=a.labels, progress=_progress_printer("prepare"))
    print(json.dumps({"prepared": report["prepared"], "skipped": len(report["skipped"])}))
    for s in report["skipped"]:
        print(f"skipped {s['source']}: {s['reason']}")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    if a.family != "hagan":
        raise SystemExit(f"voxgen train: family {a.family!r} is not available yet; available: hagan")
    from model.hagan.train import train

    opts = {
        k: getattr(a, k)
        for k in (
            "data",
            "output",
            "resolution",
            "iterations",
            "batch",
            "device",
            "resume",
            "seed",
            "checkpoint_every",
            "preview_every",
            "width",
            "latent_dim",
        )
    }
    out = train(opts)
    print(out)
    return 0


def register(sub: argparse._SubParsersAction, commands: dict[str, Callable]) -> None:
    s = sub.add_parser("prepare", help="turn a folder of scans into a training dataset")
    s.add_argument("src", help="folder of NIfTI/NRRD/MHA files or DICOM series (one per folder)")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--modality", choices=["ct", "mri"], required=True)
    s.add_argument("--resolution", type=int, choices=[128, 256, 512], default=256)
    s.add_argument("--labels", help="CSV with columns file,label[,attributes...]")
    commands["prepare"] = cmd_prepare

    s = sub.add_parser("train", help="train a model on a prepared dataset")
    s.add_argument("--family", default="hagan")
    s.add_argument("--data", required=True)
    s.add_argument("-o", "--output", required=True, help="run folder (checkpoints, metrics, previews, model)")
    s.add_argument("--resolution", type=int, choices=[128, 256, 512])
    s.add_argument("--iterations", type=int, default=1000)
    s.add_argument("--batch", type=int, default=2)
    s.add_argument("--device", default="auto")
    s.add_argument("--resume", action="store_true")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--checkpoint-every", type=int, default=100)
    s.add_argument("--preview-every", type=int, default=100)
    s.add_argument("--width", type=float, default=1.0)
    s.add_argument("--latent-dim", type=int, default=1024)
    commands["train"] = cmd_train
