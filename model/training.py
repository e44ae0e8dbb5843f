"""One entry point for training whatever the family: ``train(options, progress)``.

Each family's trainer lives in ``model/<family>/train.py`` and exposes
``train(options: dict, progress=None) -> Path`` returning the finished model directory
(``RUN/model``).  Options common to every family: ``data``, ``output``, ``iterations``, ``batch``,
``device``, ``resume``, ``seed``, ``checkpoint_every``, ``preview_every``; a family ignores the
options that are not its own, and an option given as None takes the family's default.

Under torchrun (``WORLD_SIZE`` > 1) ``train`` joins the process group first (model/distributed.py) and
the families that support it (hagan, splitshuffle, stylegan3d) train data-parallel; ``fit_loop`` lets
rank 0 alone write the metrics, checkpoints, previews, the quality monitor, the final model and the
progress, while every rank steps.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from model import families
from model.checkpoint import TrainingCheckpoint, save_training_checkpoint

if TYPE_CHECKING:
    import numpy as np
    import torch

    from model.base import Progress
    from model.data.datasets import VolumeDataset

TRAINERS: dict[str, str] = {name: f.trainer for name, f in families.FAMILIES.items()}

# The loop's options and their defaults, the same in every family: a trainer's ``DEFAULTS`` are
# ``LOOP_DEFAULTS | {its own}`` (``batch`` differs by family and is its own).
LOOP_DEFAULTS: dict[str, Any] = {
    "iterations": 1000,
    "device": "auto",
    "resume": False,
    "seed": 0,
    "checkpoint_every": 100,
    "preview_every": 100,
    "log_every": 10,
}
KEEP_CHECKPOINTS = 3  # the newest checkpoints fit_loop keeps where ``keep_checkpoints`` is not given


class LoopTrainer(Protocol):
    """What ``fit_loop`` needs from a family's trainer."""

    o: dict[str, Any]  # options: iterations, log_every, checkpoint_every, preview_every
    run: Path
    iteration: int
    progress: Progress | None

    def step(self) -> dict[str, float]: ...
    def save_checkpoint(self) -> Path: ...
    def preview(self) -> Path: ...


class CheckpointTrainer(LoopTrainer, Protocol):
    """What ``write_checkpoint`` and ``resume_checkpoint`` need from a family's trainer besides."""

    cfg: Any  # the family's config (``to_dict``)
    opts: dict[str, torch.optim.Optimizer]
    rng: np.random.Generator  # batches and the like
    device: torch.device

    def generators(self) -> dict[str, torch.Generator]: ...  # its CPU generators by name


def write_checkpoint(
    t: CheckpointTrainer,
    weights: dict[str, torch.Tensor],
    extra: dict[str, torch.Tensor] | None = None,
    state: dict[str, Any] | None = None,
) -> Path:
    """Checkpoint ``t`` at its iteration in the training-checkpoint layout every family shares
    (model/checkpoint.py): ``weights`` the model it serves, ``extra`` its other tensors, ``state`` its
    own ``state.json`` fields; then RUN/model and RUN/latest.json.  Returns the checkpoint's folder."""
    return save_training_checkpoint(
        t.run,
        t.iteration,
        t.cfg.to_dict(),
        weights,
        optimizers=t.opts,
        generators=t.generators(),
        numpy_rng=t.rng,
        options=t.o,
        device=t.device,
        extra=extra,
        state=state,
    )


def dataset_fields(data: VolumeDataset, shape: tuple[int, int, int]) -> dict[str, Any]:
    """The config fields a model trained on the prepared ``data`` records of it, for a network on the
    grid ``shape`` (D, H, W) resampled from the data's cubes (``model.data.grid.resample``):
    modality, intensity, the dataset's preprocessing, the cube's resolution (``data_resolution``)
    and the voxel size on the grid (``spacing``, the cube's scaled by R / size), so that the
    config's ``cube()`` is the dataset's and a served scan is prepared as the training data were."""
    from model.data.grid import grid_spacing

    cube = data.cube()
    return {
        "modality": cube.modality,
        "intensity": cube.intensity,
        "preprocess": cube.preprocess,
        "data_resolution": cube.resolution,
        "spacing": grid_spacing(cube.spacing, cube.resolution, shape),
    }


def resume_checkpoint(t: CheckpointTrainer, ck: TrainingCheckpoint) -> None:
    """Restore ``t``'s optimizers, RNG states and iteration from ``ck`` (its networks the trainer loads)."""
    t.iteration = ck.restore(t.opts, t.generators(), t.rng, t.device)


def fit_loop(t: LoopTrainer) -> Path:
    """The run loop every family shares: iterate ``t.step()`` up to ``o["iterations"]``, append the
    losses to ``RUN/metrics.jsonl`` (rows past the checkpoint a resumed run starts from are dropped
    first, so each iteration appears once), print iteration, losses, it/s and ETA every
    ``log_every``, checkpoint every ``checkpoint_every`` (keeping the newest ``keep_checkpoints``)
    and preview every ``preview_every`` iterations (and at the last one), run the trainer's quality
    ``monitor()`` every ``monitor_every`` iterations where it has one (its figures join that
    iteration's row and progress line), and report ``progress(done, total, "train")``.  Returns
    ``RUN/model``.  In a distributed run every rank steps and rank 0 alone does the rest (its
    ``step()`` losses are already the global batch's); the other ranks return once rank 0 is done."""
    from model import distributed

    if not distributed.is_main():
        while t.iteration < int(t.o["iterations"]):
            t.step()
        return t.run / "model"
    t.run.mkdir(parents=True, exist_ok=True)
    total = int(t.o["iterations"])
    f = t.run / "metrics.jsonl"
    if f.is_file():
        keep = [ln for ln in f.read_text().splitlines() if ln and json.loads(ln)["iteration"] <= t.iteration]
        f.write_text("".join(ln + "\n" for ln in keep))
    t0, start = time.perf_counter(), t.iteration
    if t.progress:
        t.progress(start, total, "train")
    monitor_every = int(t.o.get("monitor_every") or 0)
    monitor = getattr(t, "monitor", None) if monitor_every > 0 else None
    with open(f, "a") as metrics:
        while t.iteration < total:
            losses = t.step()
            it = t.iteration
            if monitor is not None and (it % monitor_every == 0 or it == total):
                losses = losses | monitor()
            rate = (it - start) / max(time.perf_counter() - t0, 1e-9)
            metrics.write(json.dumps({"iteration": it, **losses, "time": time.time()}) + "\n")
            if it % int(t.o["log_every"]) == 0 or it == total:
                metrics.flush()
                eta = (total - it) / rate if rate > 0 else math.inf
                msg = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
                sys.stderr.write(f"[{it}/{total}] {msg} | {rate:.2f} it/s, ETA {eta:.0f} s\n")
            if it % int(t.o["checkpoint_every"]) == 0 or it == total:
                metrics.flush()
                t.save_checkpoint()
                keep = t.o.get("keep_checkpoints")
                prune_checkpoints(t.run / "checkpoints", KEEP_CHECKPOINTS if keep is None else int(keep))
            if it % int(t.o["preview_every"]) == 0 or it == total:
                t.preview()
            if t.progress:
                t.progress(it, total, "train")
    if not (t.run / "latest.json").is_file():  # nothing was left to do (already at ``iterations``)
        t.save_checkpoint()
    return t.run / "model"


def prune_checkpoints(folder: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (``iter_*`` folders) in ``folder``; 0 keeps all.
    The one ``latest.json`` names is among the newest, so resume is never affected; a run's best
    model lives in RUN/best, outside this folder.  Returns the deleted folders."""
    import shutil

    if keep <= 0 or not folder.is_dir():
        return []
    cks = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("iter_"))
    gone = cks[:-keep]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def trainer_module(family: str) -> Any:
    """The training module of a family (model/families.py); ValueError for an unknown one."""
    return families.get(family).trainer_module()


def train(options: dict[str, Any], progress: Progress | None = None) -> Path:
    """Train (or resume, with ``options['resume']``) a run of ``options['family']`` (default hagan).

    Started by torchrun (``WORLD_SIZE`` > 1): joins the process group (model/distributed.py), trains on
    this rank's device (``cuda:LOCAL_RANK`` on CUDA) and reports ``progress`` from rank 0 only.  Where
    no callback is given, ``VOXGEN_PROGRESS_FILE`` names a file rank 0 writes its progress to."""
    from model import distributed

    family = options.get("family") or "hagan"
    world = distributed.env_world_size()
    if world > 1 and family not in families.multi_process():
        raise ValueError(
            f"family {family!r} trains in one process only; torchrun with several processes trains "
            f"{', '.join(families.multi_process())}"
        )
    with distributed.session(options.get("device")) as (ctx, device):
        if world > 1:
            options = dict(options, device=device)
        if progress is None and os.environ.get("VOXGEN_PROGRESS_FILE"):
            progress = distributed.progress_file_writer(os.environ["VOXGEN_PROGRESS_FILE"])
        return trainer_module(family).train(dict(options, family=family), progress if ctx.main else None)
