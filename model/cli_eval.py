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
        n=a.n,
        n_real=a.n_real,
        seed=a.seed,
        batch=a.batch,
        grid=a.grid,
        reference=a.reference,
        medicalnet=a.medicalnet,
        inception=a.inception,
        ms_ssim_pairs=a.ms_ssim_pairs,
        device=a.device,
        progress=_progress_printer("evaluate"),
    )
    mt = r["metrics"]
    summary = {
        "report": f"{a.output}/report.json",
        "n_generated": r["generated"]["n"],
        "n_real": r["real"]["n"],
        "features": {k: v for k, v in mt["features"].items()},
        "slicewise_average": mt["slicewise"]["average"],
        "slice_features": mt["slice_feature_name"],
        "bmmd2": mt["bmmd2"].get("mean"),
        "ms_ssim_generated": (mt["ms_ssim"]["generated"] or {}).get("mean"),
        "ms_ssim_real": (mt["ms_ssim"]["real"] or {}).get("mean"),
    }
    print(json.dumps(summary, indent=1))
    return 0


def register(sub: argparse._SubParsersAction, commands: dict[str, Callable]) -> None:
    s = sub.add_parser(
        "evaluate",
        help="compare a model's volumes with a prepared real dataset (MMD, Frechet, MS-SSIM, slice-wise, plots)",
    )
    s.add_argument("--model", required=True, help="model directory")
    s.add_argument("--real", required=True, help="a prepared dataset (voxgen prepare)")
    s.add_argument("--n", type=int, default=64, help="generated volumes (default 64)")
    s.add_argument("--n-real", type=int, help="real volumes (default: all; else a seeded random subset)")
    s.add_argument("--seed", type=int, default=0, help="latents: model.sample_latents(n, seed); real subset order")
    s.add_argument("--batch", type=int, default=8, help="chunk size: MS-SSIM pairs and batch MMD^2 (default 8)")
    s.add_argument("--grid", type=_shape, help="evaluation grid D or DxHxW (default: the model's output shape)")
    s.add_argument("--reference", help="a trained hagan/alphawgan model directory whose encoder gives 3D features")
    s.add_argument("--medicalnet", help="MedicalNet (Med3D ResNet) weights: .pth state dict or .safetensors")
    s.add_argument(
        "--inception",
        metavar="WEIGHTS",
        help="InceptionV3 weights for slice-wise FID: pytorch-fid's pt_inception-2015-12-05 .pth, "
        "torchvision's inception_v3 .pth, or .safetensors",
    )
    s.add_argument("--ms-ssim-pairs", type=int, help="MS-SSIM pairs per chunk (default: all pairs in the chunk)")
    s.add_argument("--device", default="auto")
    s.add_argument("-o", "--output", required=True, help="report folder")
    commands["evaluate"] = cmd_evaluate
