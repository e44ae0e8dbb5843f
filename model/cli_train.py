"""`voxgen prepare` and `voxgen train` (registered into model/cli.py)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from model import families


def cmd_prepare(a: argparse.Namespace) -> int:
    from model.base import Intensity
    from model.cli import _progress_printer
    from model.data.datasets import prepare_dataset
    from model.hagan.config import HAGANConfig

    cfg = HAGANConfig(
        resolution=a.resolution,
        modality=a.modality,
        intensity=Intensity.for_modality(a.modality),
        preprocess={"mode": a.preprocess},
    )
    if a.preprocess == "physical":
        cfg.spacing = None if a.spacing == "auto" else _spacing(a.spacing)  # type: ignore[assignment]
    report = prepare_dataset(
        a.src, a.output, cfg, labels_csv=a.labels, progress=_progress_printer("prepare"), series_uids=a.series_uid
    )
    summary = {"prepared": report["prepared"], "skipped": len(report["skipped"])}
    if "series_left_out" in report:
        summary["series_left_out"] = report["series_left_out"]  # DICOM series not among --series-uid
    print(json.dumps(summary))
    for s in report["skipped"]:
        print(f"skipped {s['source']}: {s['reason']}")
    return 0


def _spacing(text: str) -> tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise SystemExit(f"--spacing: expected auto, MM or X,Y,Z in mm; got {text!r}") from None
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3 or min(vals) <= 0:
        raise SystemExit(f"--spacing: expected auto, MM or X,Y,Z (positive, mm); got {text!r}")
    return vals  # type: ignore[return-value]


def cmd_train(a: argparse.Namespace) -> int:
    from model.training import train

    opts = {k: v for k, v in vars(a).items() if k not in ("func", "command", "verbose")}
    print(train(opts))
    return 0


def register(sub: argparse._SubParsersAction, commands: dict[str, Callable]) -> None:
    s = sub.add_parser("prepare", help="turn a folder of scans into a training dataset")
    s.add_argument(
        "src",
        help="folder of NIfTI/NRRD/MHA files and DICOM folders (files found by content, any names; every series "
        "of a folder is one scan, named FOLDER#SERIESUID when the folder holds several)",
    )
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--modality", choices=["ct", "mri"], required=True)
    s.add_argument("--resolution", type=int, choices=[128, 256, 512], default=256)
    s.add_argument(
        "--labels", help="CSV with columns file,label[,attributes...]; file: a scan's path, FOLDER#SERIESUID or FOLDER"
    )
    s.add_argument(
        "--series-uid",
        action="append",
        metavar="UID",
        help="read only the DICOM series with this SeriesInstanceUID (repeat for several); scan files are all read",
    )
    s.add_argument(
        "--preprocess",
        choices=["physical", "stretch"],
        default="physical",
        help="physical (default): resample to --spacing, field of view centred on the foreground, never "
        "stretched; stretch: the HA-GAN authors' (trim blank slices, resize to the cube)",
    )
    s.add_argument(
        "--spacing",
        default="auto",
        help="voxel size of the model grid in mm (MM or X,Y,Z); auto: the field of view holds the largest "
        "foreground of the data with a 1.25x margin",
    )
    commands["prepare"] = cmd_prepare

    s = sub.add_parser("train", help="train a model on a prepared dataset")
    s.add_argument("--family", default="hagan", choices=families.NAMES)
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
    s.add_argument(
        "--lr",
        type=float,
        help="learning rate of alphawgan, splitshuffle and stylegan3d (default: the paper's for the family; "
        "hagan refuses it: --lr-g, --lr-d, --lr-e)",
    )
    g = s.add_argument_group("hagan")
    g.add_argument("--resolution", type=int, choices=[128, 256, 512], help="default: the dataset's")
    g.add_argument("--width", type=float, help="channel width multiplier (default 1.0 = the paper's)")
    g.add_argument("--latent-dim", type=int, help="latent size (hagan default 1024, alphawgan 1000)")
    g.add_argument(
        "--gh-width",
        type=float,
        help="hagan: G^H's hidden width (it draws every voxel; default: --width's); with --init-from it may be "
        "wider than the model's, whose G^H is then widened by copying channels",
    )
    g.add_argument(
        "--amp",
        choices=["auto", "on", "off"],
        default="auto",
        help="bf16 autocast: auto = on CUDA devices with bf16; on = also on the CPU (about 2x faster per iteration "
        "on CPUs with AMX; slow on CPUs without native bf16; benchmarks/RESULTS.md)",
    )
    g.add_argument("--lr-g", type=float, help="G's learning rate (default 1e-4; a resumed run takes the new one)")
    g.add_argument("--lr-d", type=float, help="D's learning rate (default 4e-4)")
    g.add_argument("--lr-e", type=float, help="the encoders' learning rate (default 1e-4)")
    g.add_argument(
        "--d-loss",
        choices=["mean-logit", "each"],
        help="mean-logit (default, the authors'): one BCE of the mean of the D^H and D^L logits; each: a BCE per "
        "discriminator, averaged (G keeps D^H's gradient when D^L finds the outline real)",
    )
    g.add_argument(
        "--sub-volumes",
        type=int,
        help="high-resolution sub-volumes per iteration, each judged by D^H (default 1, the authors'); K costs K "
        "times G^H and D^H",
    )
    g.add_argument("--whole-stats", choices=["on", "off"], help="G^H GroupNorm with whole-volume statistics")
    g.add_argument("--any-start", choices=["on", "off"], help="sub-volumes may start at any slice")
    g.add_argument("--lowres", choices=["nearest", "average"], help="how the real low-resolution volume is made")
    g.add_argument("--norm-min-group", type=int, help="GroupNorm: at least this many channels per group")
    g.add_argument("--lambda-latent", type=float, help="encoder: weight of |E(G(z)) - z|")
    g.add_argument("--lambda-prior", type=float, help="encoder: weight of the prior on its codes")
    g.add_argument(
        "--lambda-rec", type=float, help="G and E^G learn together to reconstruct the real volumes: its weight (0: off)"
    )
    g.add_argument(
        "--rec-region",
        choices=["sub-volume", "whole"],
        help="what the reconstruction compares: sub-volume (default, the authors' E^G loss) = G^H's sub-volume plus "
        "the low-res volume; whole = G^H's whole volume plus the low-res volume",
    )
    g.add_argument(
        "--latent-refit",
        type=int,
        help="every N iterations, fold a Gaussian fitted to E^G's codes of the training volumes into E^G's output "
        "and G^A's first layer, so sampled latents land where real volumes' codes are (0: off)",
    )
    g.add_argument(
        "--rec-warmup",
        type=int,
        help="the first N iterations train G and the encoders by reconstruction alone (D idle; needs --lambda-rec)",
    )
    g.add_argument(
        "--freeze-g",
        choices=["on", "off"],
        help="on: only the encoders train, through the frozen G of --init-from (its samples unchanged; D and the "
        "quality monitor idle): fitting a model's encoder to new scans",
    )
    g.add_argument(
        "--objective",
        choices=["gan", "glo"],
        help="gan (default): the authors' game; glo: G alone, fitted with a latent code per training volume "
        "(generative latent optimisation; D and the encoders idle, their training afterwards with --init-from "
        "RUN/model --freeze-g on); the served G samples the Gaussian fitted to the codes",
    )
    g.add_argument("--code-noise", type=float, help="glo: sd of Gaussian noise on the codes on their way into G")
    g.add_argument("--lr-codes", type=float, help="glo: learning rate of the codes (default 1e-2)")
    g.add_argument("--code-prior", type=float, help="glo: weight of the pull of the codes' mean square to 1")
    g.add_argument(
        "--code-floor", type=float, help="glo: the served Gaussian's eigenvalue floor, a fraction of their mean"
    )
    g = s.add_argument_group("small-data recipe (every family)")
    g.add_argument(
        "--recipe",
        choices=["authors", "small-data"],
        help="authors (default): the paper's; small-data: augmentation of the real volumes, DiffAugment on D's "
        "inputs, an EMA of G (served), the quality monitor keeping RUN/best, and for hagan whole-volume "
        "GroupNorm statistics, any-start sub-volumes, average-pooled low-res and the encoder's latent and "
        "prior terms (each also an option)",
    )
    g.add_argument("--augment", choices=["on", "off"], help="on-the-fly augmentation of the real volumes")
    g.add_argument("--diffaug", choices=["on", "off"], help="DiffAugment on every input of D")
    g.add_argument("--ema", type=float, help="hagan, alphawgan: EMA decay of G, served (0: off)")
    g.add_argument("--monitor-every", type=int, help="quality monitor every N iterations (0: off)")
    g.add_argument("--monitor-n", type=int, help="volumes the quality monitor generates (default 8)")
    s.add_argument("--keep-checkpoints", type=int, help="keep the newest K checkpoints (default 3; 0: all)")
    g = s.add_argument_group("splitshuffle / stylegan3d")
    g.add_argument("--shape", help="volume grid DxHxW, e.g. 32x64x64 (default 32x64x64)")
    g.add_argument("--variant", help="the paper's architecture variant (baseline, split-shuffle, ...)")
    g.add_argument("--dims", type=int, choices=[2, 3], default=3, help="2: train on axial slices for inflation")
    g.add_argument(
        "--init-from",
        help="hagan: a model directory (or run folder) whose weights start this run (fine-tuning; its width, "
        "latent size and grid are taken); splitshuffle/stylegan3d: a 2D run (or model directory) to inflate "
        "into this 3D run",
    )
    g.add_argument("--inflate", default="inflate-1", help="inflation strategy (inflate-1, inflate-2, ...)")
    g.add_argument("--inflate-parts", default="gd", choices=["g", "d", "gd"], help="inflate G, D or both")
    commands["train"] = cmd_train
