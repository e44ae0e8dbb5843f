"""Plain helpers shared by several test modules (fixtures live in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
