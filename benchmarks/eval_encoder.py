"""The encoder on a held-out scan and on it scaled in physical size: what `voxgen reconstruct` gives a
user, measured in the scan's own world space.

For each scale s the scan's affine is multiplied by s (the same voxels, a brain s times larger per
axis), and the scan goes through the one preprocessing path (``load_for_model``), the model's
encoder and generator, and back onto the scan's grid (``to_input_grid``, what ``reconstruct
--space input`` writes).  Per scale it prints:

* the reconstruction's L1 in model space ([-1, 1]) beside two constant volumes: the voxel-wise
  median of the training set (``--data``; the best single volume for L1 over it) and the mean of
  ``--n`` generated samples (what an encoder that ignores its input would give);
* the brain volume (ml) of the input and of the reconstruction, on the input's grid: voxels above
  ``--threshold`` of the intensity window (the scan: its 99.9th percentile is the window's top, as
  ``prepare`` does for MRI); their ratio, which should follow the input's size;
* the Dice of the two brain masks on the input's grid (the reconstruction overlaid in world space).

    python benchmarks/eval_encoder.py --model models/demo-brain-mri --scan HELDOUT.nii.gz \\
        --data DEMO_DS [--scales 0.85,0.925,1,1.075,1.15] [--steps N] [--png OUT.png]

``--steps N``: the encoder's latent fitted by N Adam steps (``voxgen encode --steps``).
``--png``: the three mid slices of each scaled input (model space) above its reconstruction.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _scaled_copy(scan: Path, s: float, folder: Path) -> Path:
    import nibabel as nib

    img = nib.load(str(scan))
    aff = img.affine.copy()
    aff[:3, :3] *= s
    aff[:3, 3] *= s  # scaled about the world origin: the brain grows about its centre (MNI: the AC)
    out = folder / f"scaled_{s:.3f}.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.float32), aff), str(out))
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 where both are empty)."""
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--scan", required=True, help="a held-out scan (NIfTI)")
    ap.add_argument("--data", required=True, help="the model's prepared training set (for the median constant)")
    ap.add_argument("--scales", default="0.85,0.925,1,1.075,1.15")
    ap.add_argument("--threshold", type=float, default=0.1, help="brain mask: fraction of the intensity window")
    ap.add_argument("--n", type=int, default=16, help="generated samples for the mean-sample constant")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--png", help="write input/reconstruction mid slices here")
    ap.add_argument("--steps", type=int, default=0, help="latent-fit steps after the encoder (encode --steps)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from model.data.datasets import VolumeDataset
    from model.data.volumes import load_for_model, read_volume, to_input_grid
    from model.registry import from_pretrained

    m = from_pretrained(a.model)
    ds = VolumeDataset(a.data)
    train = np.stack([np.asarray(ds.volume(i), np.float32) for i in range(len(ds))])
    median = np.median(train, axis=0)
    del train
    with torch.no_grad():
        z = torch.randn(a.n, m.config.latent_dim, generator=torch.Generator().manual_seed(0))
        mean_sample = torch.cat([m.generate(z[i : i + 1]) for i in range(a.n)]).mean(0)[0].numpy()
    lo_mask = -1.0 + 2.0 * a.threshold  # the threshold on the model's [-1, 1] scale
    rows, tiles = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for s in (float(v) for v in a.scales.split(",")):
            path = _scaled_copy(Path(a.scan), s, Path(tmp))
            info: dict = {}
            x = load_for_model(path, m.config, info=info)
            rec = m.generate(m.encode(torch.from_numpy(x)[None, None], steps=a.steps))[0, 0].numpy()
            mae = float(np.abs(rec - x).mean())
            arr, sp = read_volume(path)
            voxel_ml = float(np.prod(sp)) / 1000.0
            m_in = arr > a.threshold * float(np.percentile(arr, 99.9))
            m_rec = to_input_grid(rec, info, m.config) > lo_mask
            v_in, v_rec = m_in.sum() * voxel_ml, m_rec.sum() * voxel_ml
            rows.append(
                (
                    s,
                    mae,
                    mae / float(np.abs(median - x).mean()),
                    mae / float(np.abs(mean_sample - x).mean()),
                    v_in,
                    v_rec,
                    dice(m_in, m_rec),
                )
            )
            if a.png:
                from model.preview import display_planes, to_uint8

                tiles.append(([to_uint8(p) for p in display_planes(x)], [to_uint8(p) for p in display_planes(rec)]))
    fit = f", latent fitted by {a.steps} steps" if a.steps else ""
    print(f"model {a.model}, scan {Path(a.scan).name}, brain mask above {a.threshold:g} of the window{fit}")
    head = "| scale | recon L1 | / training median's | / mean sample's | input brain ml | recon brain ml | ratio"
    head += " | Dice |"
    print(head)
    print("|---|---|---|---|---|---|---|---|")
    for s, mae, r_med, r_mean, v_in, v_rec, d in rows:
        cells = f"{s:g} | {mae:.4f} | {r_med:.2f} | {r_mean:.2f} | {v_in:.0f} | {v_rec:.0f}"
        cells += f" | {v_rec / v_in:.3f} | {d:.3f}"
        print(f"| {cells} |")
    if a.png:
        from model.preview import montage, save_png

        grid = [row for pair in tiles for row in pair]
        save_png(montage([[t for t in row] for row in grid], min_tile=96), a.png)
        print(f"wrote {a.png}: per scale, the input (model space) above its reconstruction")


if __name__ == "__main__":
    main()
