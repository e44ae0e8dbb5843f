"""Plain helpers shared by several test modules (fixtures live in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

    from model.hagan.config import HAGANConfig


def phantom_dataset(
    root: Path,
    modality: str,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    n: int = 4,
    config: HAGANConfig | None = None,
) -> Path:
    """Write ``n`` phantoms (chest{i} for CT, head{i} for MRI, seeds 0..n-1) to root/src, prepare them into root/ds."""
    from model.data.datasets import prepare_dataset
    from model.data.phantoms import write_phantom
    from model.hagan.config import HAGANConfig

    stem = "head" if modality == "mri" else "chest"
    for i in range(n):
        write_phantom(root / "src" / f"{stem}{i}.nii.gz", modality, shape, spacing, seed=i)
    prepare_dataset(root / "src", root / "ds", config if config is not None else HAGANConfig(resolution=128))
    return root / "ds"


def straight_and_resumed(trainer: type, opts: dict[str, Any], out: Path, stop: int, total: int) -> tuple[Any, Any]:
    """Trainers run to ``total`` iterations in one go (out/a) and stopped at ``stop`` then resumed (out/b)."""
    a = trainer(opts | {"output": str(out / "a"), "iterations": total})
    a.fit()
    b = trainer(opts | {"output": str(out / "b"), "iterations": stop})
    b.fit()
    del b
    b = trainer(opts | {"output": str(out / "b"), "iterations": total, "resume": True})
    assert b.iteration == stop
    b.fit()
    return a, b


def spread(v: np.ndarray) -> np.ndarray:
    """How far a model-space volume's foreground reaches along each axis: the standard deviation of
    the voxel coordinates weighted by v + 1 (the background, -1, weighs nothing).  Sub-voxel, so a
    1.1x larger object measures 1.1x on a coarse network grid too."""
    import numpy as np

    w = np.asarray(v, np.float64) + 1.0
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        profile = w.sum(axis=other)
        idx = np.arange(len(profile), dtype=np.float64)
        mean = (profile * idx).sum() / profile.sum()
        out.append(np.sqrt((profile * (idx - mean) ** 2).sum() / profile.sum()))
    return np.array(out)


def check_served_as_trained(
    dataset: Path,
    model: Any,
    trained: np.ndarray,
    seen: Callable[[torch.Tensor], torch.Tensor],
    tmp: Path,
) -> None:
    """The one preprocessing path for a family whose network grid is not the prepared cube
    (alpha-WGAN-GP, the style-based ones), ``model`` trained on the physical-units ``dataset``:

    - the model's cube is the dataset's, and ``load_for_model`` brings the dataset's first scan to
      the array ``prepare`` stored (up to its float16 storage);
    - ``seen(x)`` (what the encoder / projection gets for the cube ``x``) is ``trained`` (what the
      trainer got for that item), exactly once the cube is stored as float16 as the dataset is;
    - the scan with 1.1x larger voxels (its affine scaled) reaches 1.1x further on the network's grid;
    - that grid volume, written in the input's space, overlays the scan."""
    import nibabel as nib
    import numpy as np
    import torch

    from model.data.datasets import VolumeDataset
    from model.data.preprocess import window
    from model.data.volumes import load_for_model, read_volume, write_in_input_space

    ds = VolumeDataset(dataset)
    scan = Path(ds.manifest["source"]) / ds.items[0]["source"]
    assert ds.manifest["preprocess"]["mode"] == "physical"
    assert model.config.cube() == ds.cube()
    info: dict[str, Any] = {}
    cube = load_for_model(scan, model.config, info=info)
    assert cube.shape == (ds.resolution,) * 3
    assert np.array_equal(cube.astype(np.float16), np.asarray(ds.volume(0)))

    def grid(v: np.ndarray) -> np.ndarray:
        return seen(torch.from_numpy(v)[None, None]).reshape(model.config.grid_shape).numpy()

    served = grid(cube.astype(np.float16).astype(np.float32))
    assert served.shape == trained.shape and np.array_equal(served, trained)
    assert np.abs(grid(cube) - trained).max() < 1e-3  # float16 storage: the only difference

    img = nib.load(scan)
    larger = nib.Nifti1Image(np.asarray(img.dataobj), np.diag([1.1, 1.1, 1.1, 1.0]) @ img.affine)
    nib.save(larger, tmp / "larger.nii.gz")
    ratio = spread(grid(load_for_model(tmp / "larger.nii.gz", model.config))) / spread(served)
    assert np.allclose(ratio, 1.1, atol=0.015), ratio

    write_in_input_space(tmp / "back.nii.gz", served, model.config, info)
    a, _ = read_volume(scan)
    back = model.config.intensity.to_model(np.asarray(nib.load(tmp / "back.nii.gz").dataobj, np.float32))
    fa, fb = window(a, model.config) > -0.5, back.transpose(2, 1, 0) > -0.5  # (x, y, z) -> (z, y, x)
    assert fb.shape == a.shape and 2 * (fa & fb).sum() / (fa.sum() + fb.sum()) > 0.9
