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
from collections.abc import Callable
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

# The small-data recipe's options every family has (a family's ``RECIPES["small-data"]`` turns them on
# beside its own parts): the real volumes augmented afresh every iteration (model/data/augment.py
# ``RandomAugment``), DiffAugment on every input of D, the quality monitor every N iterations
# (``QualityMonitor``, which keeps RUN/best) on ``monitor_n`` volumes.
RECIPE_DEFAULTS: dict[str, Any] = {
    "recipe": "authors",
    "augment": "off",
    "diffaug": "off",
    "monitor_every": 0,
    "monitor_n": 8,
}


def recipe_options(
    defaults: dict[str, Any], recipes: dict[str, dict[str, Any]], given: dict[str, Any]
) -> dict[str, Any]:
    """A trainer's options: its ``defaults``, then the parts of the recipe named in ``given`` (default
    ``defaults["recipe"]``), then what was ``given`` (options given as None are left out by the
    caller); the recipe's name and the on/off switches are checked."""
    recipe = str(given.get("recipe", defaults["recipe"]))
    if recipe not in recipes:
        raise ValueError(f"recipe must be one of {', '.join(recipes)}, got {recipe!r}")
    o = defaults | recipes[recipe] | given
    for k in ("augment", "diffaug"):
        if o[k] not in ("on", "off"):
            raise ValueError(f"{k} must be on or off, got {o[k]!r}")
    if int(o["monitor_every"]) < 0 or int(o["monitor_n"]) < 2:
        raise ValueError("monitor_every must be >= 0 and monitor_n >= 2")
    return o


def recipe_record(o: dict[str, Any], defaults: dict[str, Any], parts: tuple[str, ...]) -> dict[str, Any]:
    """What a config's ``training`` field records of a run's options ``o``: the recipe and its
    ``parts`` where any differs from ``defaults`` (the authors' training), else ``{}``, so that the
    config of a run trained as the paper says is unchanged."""
    keys = ("recipe", *parts)
    return {k: o[k] for k in keys} if any(o[k] != defaults[k] for k in keys) else {}


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
    if world > 1:
        distributed.refuse_one_process_family(family)
    with distributed.session(options.get("device")) as (ctx, device):
        if world > 1:
            options = dict(options, device=device)
        if progress is None and os.environ.get("VOXGEN_PROGRESS_FILE"):
            progress = distributed.progress_file_writer(os.environ["VOXGEN_PROGRESS_FILE"])
        return trainer_module(family).train(dict(options, family=family), progress if ctx.main else None)


MONITOR_MIN_REAL = 4  # the monitor's floor compares two halves of at least two real volumes each


class QualityMonitor:
    """The in-training quality monitor every family's small-data recipe shares: the evaluation's
    texture distance (fd_texture) of ``n`` generated volumes against up to ``2 * n`` real volumes of
    the training set (not augmented), on the model's native grid (a coarser one would average away
    blockiness finer than its voxels), beside its real-vs-real floor at the same size, and the
    coarse-anatomy spread ratio that flags collapse (a warning on stderr).  ``__call__`` returns the
    figures (``q_*``) for the iteration's metrics row; the lowest fd_texture so far (among figures
    taken on one grid) is kept as a model directory in ``RUN/best`` with ``best.json``.  With fewer
    than ``MONITOR_MIN_REAL`` training volumes there is no floor: the monitor says so once and is off.

    ``real(i)``: training volume ``i`` as a [D, H, W] array on any grid;
    ``generate(z)``: volumes [k, 1, D, H, W] from latents [k, latent] (the served G, eval mode; run
    without gradients).  The latents are fixed (``seed``, 4321 in training), so successive figures
    differ by the weights only.  ``best`` (the trainer's checkpoints keep it) is the best figure so far."""

    def __init__(self, run: Path, grid: tuple[int, int, int], n: int, latent_dim: int, seed: int = 4321) -> None:
        self.run, self.grid, self.n, self.latent_dim = run, tuple(int(g) for g in grid), int(n), int(latent_dim)
        self.seed = int(seed)
        self.best: dict[str, Any] | None = None  # set from the checkpoint on resume
        self._real: dict[str, torch.Tensor] | None = None
        self._warned = False

    def __call__(
        self,
        iteration: int,
        data_len: int,
        real: Callable[[int], Any],
        generate: Callable[[torch.Tensor], torch.Tensor],
        config: dict[str, Any],
        served_state: Callable[[], dict[str, torch.Tensor]],
        chunk: int = 2,
    ) -> dict[str, float]:
        import numpy as np
        import torch

        from model.checkpoint import save_model_dir, write_json_atomic
        from model.data.grid import resample
        from model.metrics.evaluate import COLLAPSE_SPREAD, split_distances, spread_ratio, standardise
        from model.metrics.features import PooledIntensity
        from model.metrics.texture import TextureBank

        n, grid = self.n, self.grid
        if data_len < MONITOR_MIN_REAL:
            if not self._warned:
                sys.stderr.write(
                    f"quality monitor: off, it needs at least {MONITOR_MIN_REAL} training volumes for its real-vs-real "
                    f"floor (the dataset has {data_len})\n"
                )
                self._warned = True
            return {}
        extract = {"texture": TextureBank(), "pooled": PooledIntensity(4)}
        with torch.no_grad():
            if self._real is None:
                k = min(data_len, 2 * n)
                idx = np.random.default_rng(0).permutation(data_len)[:k]
                x = torch.from_numpy(np.stack([np.asarray(real(int(i)), np.float32) for i in idx]))[:, None]
                x = resample(x, grid)
                self._real = {name: e(x) for name, e in extract.items()}
            zs = torch.randn(n, self.latent_dim, generator=torch.Generator().manual_seed(self.seed))
            fake = torch.cat([resample(generate(zs[i : i + chunk]).float().cpu(), grid) for i in range(0, n, chunk)])
        gf = {name: e(fake) for name, e in extract.items()}
        rf = dict(self._real)
        rf["texture"], gf["texture"] = standardise(rf["texture"], gf["texture"])
        m = min(n, len(rf["texture"]) // 2)
        dist, floor = split_distances({"texture": gf["texture"][:m]}, {"texture": rf["texture"]}, m, 10, 0)
        spread = spread_ratio(gf["pooled"], rf["pooled"])
        out = {
            "q_fd_texture": dist["texture"]["fd"],
            "q_floor": floor["texture"]["fd"]["mean"],
            "q_floor_sd": floor["texture"]["fd"]["sd"],
            "q_spread": spread,
        }
        if spread < COLLAPSE_SPREAD:
            sys.stderr.write(
                f"[{iteration}] quality monitor: mode collapse? the samples' coarse anatomy varies "
                f"{spread:.2f}x as much as the real volumes'\n"
            )
        comparable = self.best is not None and self.best.get("grid") == list(grid)  # figures of one grid only
        if not comparable or out["q_fd_texture"] < self.best["q_fd_texture"]:  # type: ignore[index]
            self.best = {"iteration": iteration, "grid": list(grid), **out}
            save_model_dir(self.run / "best", config, served_state())
            write_json_atomic(self.run / "best" / "best.json", self.best)
        return out
