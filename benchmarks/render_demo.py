"""Render what a model makes beside real volumes: one row per volume, its mid axial, coronal and
sagittal slices (``model.preview.montage_png``, as the training previews and the evaluation's
montages), in model space ([-1, 1], the model's grid).

    python benchmarks/render_demo.py --model models/demo-brain-mri --n 8 --seed 0 -o samples.png
    python benchmarks/render_demo.py --data HELDOUT_DS --n 8 -o real.png

``--model``: ``n`` samples from ``sample_latents(n, seed)`` (the latents ``voxgen generate --seed S
--n N`` and the evaluation draw); ``--data``: ``n`` volumes of a prepared dataset spread evenly over
it (its first, last and between).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a model directory: render its samples")
    src.add_argument("--data", help="a prepared dataset: render its volumes")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from model.preview import montage_png

    if a.model:
        from model.registry import from_pretrained

        m = from_pretrained(a.model)
        z = m.sample_latents(a.n, a.seed)
        with torch.no_grad():
            vols = [m.generate(z[i : i + 1])[0, 0].numpy() for i in range(a.n)]
        what = f"{a.n} samples of {a.model} (seed {a.seed})"
    else:
        from model.data.datasets import VolumeDataset

        ds = VolumeDataset(a.data)
        idx = np.unique(np.linspace(0, len(ds) - 1, a.n).round().astype(int))
        vols = [np.asarray(ds.volume(int(i)), np.float32) for i in idx]
        what = f"volumes {[int(i) for i in idx]} of {a.data}"
    out = montage_png(np.stack(vols), a.output)
    print(f"{out}: {what}")


if __name__ == "__main__":
    main()
