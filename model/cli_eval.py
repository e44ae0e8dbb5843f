"""`voxgen evaluate` (registered into model/cli.py): distribution distances, diversity, slice-wise
figures, an embedding plot and montages of a model against a prepared real dataset."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable


def _shape(s: str) -> tuple[int, int, int]:
    parts = tuple(int(x) for x in s.lower().split("x"))
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected D, or DxHxW, e.g. 64 or 64x64x64; got {s!r}")
    return parts  # type: ignore[return-value]


def cmd_evaluate(a: argparse.Namespace) -> int:
    from model.cli import _progress_printer
    from model.metrics.evaluate import evaluate

    r = evaluate(
        a.model,
        a.real,
        a.output,
        samples=a.samples,
        n=a.n,
        n_real=a.n_real,
        seed=a.seed,
        batch=a.batch,
        grid=a.grid,
        reference=a.reference,
        medicalnet=a.medicalnet,
        inception=a.inception,
        ms_ssim_pairs=a.ms_ssim_pairs,
        floor_splits=a.floor_splits,
        device=a.device,
        progress=_progress_printer("evaluate"),
        encode_steps=a.encode_steps,
    )
    summary = {
        "report": f"{a.output}/report.json",
        "headline": r["headline"],
        "floor": r["floor"],
        "n_generated": r["generated"]["n"],
        "n_real": r["real"]["n"],
        "distances": {k: {s: v[s] for s in ("fd", "kid", "kid_sd")} for k, v in r["distances"].items()},
        "diversity": {k: r["diversity"][k] for k in ("ms_ssim_generated", "ms_ssim_real", "pooled_spread_ratio")},
        "warnings": r["warnings"],
    }
    print(json.dumps(summary, indent=1))
    return 0


def register(sub: argparse._SubParsersAction, commands: dict[str, Callable]) -> None:
    s = sub.add_parser(
        "evaluate",
        help="score a model's volumes, or a folder of volumes, against a prepared real dataset (texture FD headline, "
        "FD and KID beside a same-size real-vs-real floor, MS-SSIM diversity, collapse warnings, plots)",
    )
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="model directory")
    what.add_argument(
        "--samples",
        metavar="FOLDER",
        help="a folder of volumes to score instead of a model (NIfTI, NRRD, MHA, DICOM series, zip, or .npy "
        "model-space arrays); read with the real set's preprocessing",
    )
    s.add_argument("--real", required=True, help="a prepared dataset (voxgen prepare)")
    s.add_argument("--n", type=int, default=64, help="generated volumes (default 64; --samples: every file)")
    s.add_argument(
        "--n-real", type=int, help="real volumes (default: all; else a seeded random subset); 2n for a same-size floor"
    )
    s.add_argument("--floor-splits", type=int, default=20, help="random real-vs-real splits for the floor (default 20)")
    s.add_argument("--seed", type=int, default=0, help="latents: model.sample_latents(n, seed); real subset order")
    s.add_argument("--batch", type=int, default=8, help="chunk size: MS-SSIM pairs and batch MMD^2 (default 8)")
    s.add_argument("--grid", type=_shape, help="evaluation grid D or DxHxW (default: the model's output shape)")
    s.add_argument(
        "--reference",
        help="a trained hagan/alphawgan model directory whose encoder gives extra 3D features (never the judged model)",
    )
    s.add_argument("--medicalnet", help="MedicalNet (Med3D ResNet) weights: .pth state dict or .safetensors")
    s.add_argument(
        "--inception",
        metavar="WEIGHTS",
        help="InceptionV3 weights for slice-wise FID: pytorch-fid's pt_inception-2015-12-05 .pth, "
        "torchvision's inception_v3 .pth, or .safetensors",
    )
    s.add_argument("--ms-ssim-pairs", type=int, help="MS-SSIM pairs per chunk (default: all pairs in the chunk)")
    s.add_argument(
        "--encode-steps",
        type=int,
        help="the reconstruction figure: each latent fitted by N steps after the encoder (encode --steps; default: "
        "the model's encode_steps)",
    )
    s.add_argument("--device", default="auto")
    s.add_argument("-o", "--output", required=True, help="report folder")
    commands["evaluate"] = cmd_evaluate
