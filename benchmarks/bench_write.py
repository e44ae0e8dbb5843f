"""What a request waits for: generation alone beside generation + writing the .nii.gz, and the
whole `voxgen generate -o x.nii.gz` process (time and peak RSS).

    python benchmarks/bench_write.py                    # 256^3, authors' width, CT and MRI
    python benchmarks/bench_write.py --res 256 --e2e 512 --repeats 3

Writers compared, on the same generated volume in one process:
  zlib      the writer before: the whole volume converted to physical units (several full-size
            temporaries), a contiguous (x, y, z) copy, nibabel's to_bytes (the whole file as bytes),
            then the standard library's gzip at level 1
  streamed  voxgen's write_volume now: header, then slabs converted to physical units written straight
            into an ISA-L gzip stream (level 1; blocks compressed on the job's threads when large)
Random weights at the authors' full width (latent 1024) unless --width; the volume is what such a
model generates (noise-like texture compresses less than a real scan: --real adds a real T1 template
resampled to the grid as a second volume to write).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_model_args  # noqa: E402
from bench_service import cpu_model  # noqa: E402
from bench_stylegan3d import median_time  # noqa: E402  (one warm-up call, then the median of repeats)


def zlib_before(v: np.ndarray, cfg) -> bytes:  # noqa: ANN001
    """The .nii.gz writer as it was (bytes, in memory)."""
    import nibabel as nib

    from model.data.export import mark_nifti_synthetic
    from model.data.volumes import _physical, volume_affine

    data = _physical(v, cfg.intensity)
    img = nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), volume_affine(data.shape, cfg.spacing))
    mark_nifti_synthetic(img.header, cfg)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", fileobj=buf, mode="wb", compresslevel=1, mtime=0) as g:
        g.write(img.to_bytes())
    return buf.getvalue()


def in_process(res: int, width: float, latent: int, repeats: int, real: str | None) -> list[dict]:
    import torch

    from model.base import Intensity
    from model.hagan.config import HAGANConfig
    from model.hagan.model import HAGANModel

    rows = []
    with tempfile.TemporaryDirectory() as d:
        for modality in ("ct", "mri"):
            cfg = HAGANConfig(resolution=res, latent_dim=latent, width=width, modality=modality)
            cfg.intensity = Intensity.for_modality(modality)
            m = HAGANModel.init(cfg, seed=0)
            z = m.sample_latents(1, 0)
            m.generate(z)  # warm-up (folding, first-touch pages)
            t_gen = median_time(lambda: m.generate(z), repeats)  # noqa: B023
            vols = {"generated": m.generate(z)[0, 0].numpy()}
            if real:
                from model.data.volumes import load_for_model

                vols["real T1"] = load_for_model(real, cfg)
            from model.data.volumes import write_volume

            for what, v in vols.items():
                out = Path(d) / f"{modality}.nii.gz"
                t_old = median_time(lambda: zlib_before(v, cfg), repeats)  # noqa: B023
                t_new = median_time(lambda: write_volume(out, v, cfg), repeats)  # noqa: B023
                size_old, size_new = len(zlib_before(v, cfg)), out.stat().st_size
                rows.append(
                    {
                        "res": res,
                        "modality": modality,
                        "volume": what,
                        "generate_s": t_gen,
                        "zlib_s": t_old,
                        "streamed_s": t_new,
                        "zlib_ratio": (t_gen + t_old) / t_gen,
                        "streamed_ratio": (t_gen + t_new) / t_gen,
                        "zlib_mb": size_old / 2**20,
                        "streamed_mb": size_new / 2**20,
                        "threads": torch.get_num_threads(),
                    }
                )
    return rows


_PEAK = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def end_to_end(res: int, width: float, latent: int) -> dict:
    """A fresh `voxgen generate -o x.nii.gz` process: wall time and peak RSS (ru_maxrss of the child)."""
    with tempfile.TemporaryDirectory() as d:
        model = Path(d) / "m"
        subprocess.run(
            [sys.executable, "-m", "model.cli", "init", "--family", "hagan", "--resolution", str(res), "--width",
             str(width), "--latent-dim", str(latent), "--modality", "ct", "--seed", "0", "-o", str(model)],
            check=True, capture_output=True,
        )  # fmt: skip
        out = {}
        for ext in (".npy", ".nii.gz"):
            cmd = [sys.executable, "-m", "model.cli", "generate", "--model", str(model), "--seed", "0", "-o",
                   str(Path(d) / f"x{ext}")]  # fmt: skip
            t = time.perf_counter()
            # a wrapper process per run, so ru_maxrss of its children is this generate process's own
            peak = subprocess.run([sys.executable, "-c", _PEAK, *cmd], check=True, capture_output=True, text=True)
            wall = time.perf_counter() - t
            out[ext] = {"wall_s": wall, "peak_mib": int(peak.stdout.split()[-1]) / 1024}
        return {"res": res, **{f"{k}_{m}": v for k, d_ in out.items() for m, v in d_.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_args(ap)
    ap.add_argument("--real", help="a real scan to write as well (brought to the model grid)")
    ap.add_argument("--e2e", type=int, nargs="*", default=[], help="end-to-end CLI processes at these resolutions")
    ap.add_argument("--json", help="also write the raw results here")
    a = ap.parse_args()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} CPUs; width {a.width}, latent {a.latent_dim}; median of {a.repeats}\n")
    rows = in_process(a.res, a.width, a.latent_dim, a.repeats, a.real)
    print("| grid | modality | volume | generate (s) | + write, zlib before (s) | + write, streamed ISA-L (s) "
          "| (gen+write)/gen before | (gen+write)/gen now | file MB before / now |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['res']}^3 | {r['modality']} | {r['volume']} | {r['generate_s']:.2f} | {r['zlib_s']:.2f} | "
            f"{r['streamed_s']:.2f} | {r['zlib_ratio']:.2f}x | {r['streamed_ratio']:.2f}x | "
            f"{r['zlib_mb']:.1f} / {r['streamed_mb']:.1f} |"
        )
    e2e = [end_to_end(res, a.width, a.latent_dim) for res in a.e2e]
    if e2e:
        print("\n| grid | `-o x.npy` wall (s) | peak RSS (MiB) | `-o x.nii.gz` wall (s) | peak RSS (MiB) |")
        print("|---|---|---|---|---|")
        for r in e2e:
            print(
                f"| {r['res']}^3 | {r['.npy_wall_s']:.1f} | {r['.npy_peak_mib']:.0f} | {r['.nii.gz_wall_s']:.1f} | "
                f"{r['.nii.gz_peak_mib']:.0f} |"
            )
    if a.json:
        Path(a.json).write_text(json.dumps({"cpu": cpu_model(), "rows": rows, "e2e": e2e}, indent=1))


if __name__ == "__main__":
    main()
