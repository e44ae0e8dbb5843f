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
    from model.training import train

    opts = {k: v for k, v in vars(a).items() if k not in ("func", "command", "verbose")}
    print(train(opts))
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
    s.add_argument("--family", default="hagan", choices=["hagan", "splitshuffle", "stylegan3d", "alphawgan"])
    s.add_argument("--data", required=True)
    s.add_argument("-o", "--output", required=True, help="run folder (checkpoints, metrics, previews, model)")
    s.add_argument("--iterations", type=int, default=1000)
    s.add_argument(
        "--batch", type=int, help="batch size (default: hagan 2, alphawgan 4, stylegan 4; 16 slices with --dims 2)"
    )
    s.add_argument("--device", default="auto")
    s.add_argument("--resume", action="store_true", help="continue the run in -o from its last checkpoint")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--checkpoint-every", type=int, default=100)
    s.add_argument("--preview-every", type=int, default=100)
    s.add_argument("--lr", type=float, help="learning rate (default: the paper's for the family)")
    g = s.add_argument_group("hagan")
    g.add_argument("--resolution", type=int, choices=[128, 256, 512], help="default: the dataset's")
    g.add_argument("--width", type=float, help="channel width multiplier (default 1.0 = the paper's)")
    g.add_argument("--latent-dim", type=int, help="latent size (hagan default 1024, alphawgan 1000)")
    g.add_argument("--amp", choices=["auto", "on", "off"], default="auto", help="mixed precision (CUDA only)")
    g = s.add_argument_group("splitshuffle / stylegan3d")
    g.add_argument("--shape", help="volume grid DxHxW, e.g. 32x64x64 (default 32x64x64)")
    g.add_argument("--variant", help="the paper's architecture variant (baseline, split-shuffle, ...)")
    g.add_argument("--dims", type=int, choices=[2, 3], default=3, help="2: train on axial slices for inflation")
    g.add_argument("--init-from", help="a 2D run (or model directory) to inflate into this 3D run")
    g.add_argument("--inflate", default="inflate-1", help="inflation strategy (inflate-1, inflate-2, ...)")
    g.add_argument("--inflate-parts", default="gd", choices=["g", "d", "gd"], help="inflate G, D or both")
    commands["train"] = cmd_train
