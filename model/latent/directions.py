"""Attribute directions in latent space (HA-GAN paper, section IV-E).

Measure an attribute on volumes (generated from sampled latents, or real scans with their encoded
latents), fit a linear model latent -> attribute (ridge regression), and move a latent along the
model's coefficient vector: the prediction changes by ``alpha * |w|`` per unit step along
``u = w / |w|``, so a target value is reached in closed form.  Directions live in the model
directory as ``directions.safetensors``: one vector per name, its fit described in the file's
metadata (one JSON string per name).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.base import Progress
from model.checkpoint import DIRECTIONS_NAME, ModelDirError, save_tensors_atomic
from model.latent import REFINE_ROUNDS
from model.latent.attributes import ATTRIBUTES, AttributeSpec  # noqa: F401  (re-exported)


def _spec(name: str) -> AttributeSpec:
    spec = ATTRIBUTES.get(name)
    if spec is None:
        raise ValueError(f"unknown attribute {name!r}; known: {', '.join(ATTRIBUTES)}")
    return spec


def measure_attribute(volume: np.ndarray, spacing: tuple[float, float, float], name: str) -> float:
    """The attribute of a volume in physical units (D, H, W): for window attributes the volume in
    mL of the voxels with ``lo <= v < hi`` (voxel count * product of the spacing in mm / 1000)."""
    spec = _spec(name)
    v = np.asarray(volume)
    if spec.kind == "mean":
        return float(v.mean(dtype=np.float64))
    count = int(np.count_nonzero((v >= spec.lo) & (v < spec.hi)))
    return count * float(np.prod(spacing)) / 1000.0


def physical_volume(v_model: np.ndarray, config: Any) -> np.ndarray:
    """A model-space volume in physical units exactly as ``write_volume`` writes it (clipped to
    [-1, 1]; CT rounded to whole HU), so a measured value matches the delivered file."""
    it = config.intensity
    phys = it.to_physical(np.clip(np.asarray(v_model, np.float32), -1.0, 1.0))
    return np.rint(phys) if it.dtype == "int16" else phys


def measure_model_volume(v_model: np.ndarray, config: Any, name: str) -> float:
    """``measure_attribute`` of a model-space (D, H, W) volume, in the model's physical units."""
    return measure_attribute(physical_volume(v_model, config), tuple(config.spacing), name)


@dataclass
class Direction:
    name: str
    attribute: str
    vector: torch.Tensor  # the fitted coefficient vector w, [latent]
    intercept: float
    r2: float  # in-sample R^2
    r2_cv: float | None  # 5-fold held-out R^2 (None when too few samples)
    n: int
    ridge: float | None = None
    source: str | None = None  # how the training pairs were made, e.g. "sample seed=0"

    def predict(self, z: torch.Tensor) -> torch.Tensor:
        """Predicted attribute for latents [n, latent] -> [n]."""
        return z.float() @ self.vector.float() + self.intercept

    def meta(self) -> dict[str, Any]:
        m: dict[str, Any] = {
            "attribute": self.attribute,
            "intercept": self.intercept,
            "r2": self.r2,
            "r2_cv": self.r2_cv,
            "n": self.n,
            "norm": float(self.vector.norm()),
        }
        if self.ridge is not None:
            m["ridge"] = self.ridge
        if self.source:
            m["source"] = self.source
        return m


def fit_linear(latents: np.ndarray, values: np.ndarray, ridge: float = 1.0) -> tuple[np.ndarray, float, float]:
    """Ridge regression values ~ latents @ w + b (intercept not penalised) -> (w, b, in-sample R^2)."""
    z = np.asarray(latents, np.float64)
    y = np.asarray(values, np.float64)
    zm, ym = z.mean(0), y.mean()
    zc = z - zm
    w = np.linalg.solve(zc.T @ zc + ridge * np.eye(z.shape[1]), zc.T @ (y - ym))
    b = ym - zm @ w
    ss = ((y - ym) ** 2).sum()
    r2 = 1.0 - ((y - (z @ w + b)) ** 2).sum() / ss if ss > 0 else 0.0
    return w, float(b), float(r2)


def cross_validated_r2(latents: np.ndarray, values: np.ndarray, ridge: float = 1.0, folds: int = 5) -> float | None:
    """Held-out R^2 from ``folds``-fold cross-validation (interleaved folds); None under 2 per fold."""
    z = np.asarray(latents, np.float64)
    y = np.asarray(values, np.float64)
    n = len(y)
    if n < 2 * folds:
        return None
    idx = np.arange(n)
    pred = np.empty(n)
    for k in range(folds):
        test = idx % folds == k
        w, b, _ = fit_linear(z[~test], y[~test], ridge)
        pred[test] = z[test] @ w + b
    ss = ((y - y.mean()) ** 2).sum()
    return float(1.0 - ((y - pred) ** 2).sum() / ss) if ss > 0 else None


def fit_values(
    latents: np.ndarray | torch.Tensor,
    values: np.ndarray | list[float],
    attribute: str,
    *,
    name: str | None = None,
    ridge: float = 1.0,
    source: str | None = None,
) -> Direction:
    """The fitting core: a Direction from latent/attribute pairs (no model needed)."""
    z = latents.double().numpy() if isinstance(latents, torch.Tensor) else np.asarray(latents, np.float64)
    y = np.asarray(values, np.float64)
    if z.ndim != 2 or y.shape != (z.shape[0],):
        raise ValueError(f"need latents [n, latent] and n values; got {z.shape} and {y.shape}")
    if len(y) < 2:
        raise ValueError(f"need at least 2 volumes to fit a direction, got {len(y)}")
    if not (np.isfinite(z).all() and np.isfinite(y).all()):
        raise ValueError("latents or attribute values are not finite")
    if np.ptp(y) == 0:
        raise ValueError(f"{attribute} is the same ({y[0]:.3f}) on every volume: nothing to fit")
    w, b, r2 = fit_linear(z, y, ridge)
    return Direction(
        name or attribute,
        attribute,
        torch.from_numpy(w).float(),
        b,
        r2,
        cross_validated_r2(z, y, ridge),
        len(y),
        ridge=float(ridge),
        source=source,
    )


def fit_direction(
    model: Any,
    attribute: str,
    *,
    name: str | None = None,
    n: int = 64,
    seed: int = 0,
    latents: torch.Tensor | None = None,
    volumes: Iterable[np.ndarray] | None = None,
    ridge: float = 1.0,
    progress: Progress | None = None,
    encode_steps: int | None = None,
) -> Direction:
    """Learn the direction of ``attribute`` for ``model``.

    - default: sample ``n`` latents from ``seed``, generate each volume, measure it;
    - ``latents``: generate from these latents instead;
    - ``volumes`` (on the model's cube (R, R, R), ``config.cube()``, as ``load_for_model`` gives real
      scans; any iterable, read one at a time): measure each and encode it, as in the paper; with
      ``latents`` as well, those are the volumes' latents and nothing is encoded; ``encode_steps``:
      each code fitted by that many steps after the encoder (``model.encode(x, steps=...)``; None:
      the model's default).
    Then fit a ridge regression latent -> attribute (``fit_values``)."""
    spec = _spec(attribute)
    if spec.modality not in ("any", model.modality):
        raise ValueError(
            f"attribute {attribute!r} is for {spec.modality.upper()} models; this model is {model.modality}"
        )
    cfg = model.config
    zs: list[torch.Tensor] = []
    ys: list[float] = []
    if volumes is not None:
        total = len(volumes) if hasattr(volumes, "__len__") else 0
        cube = cfg.cube()  # real volumes come on the model's cube (load_for_model), measured there
        r = cube.resolution
        for i, v in enumerate(volumes):
            a = np.asarray(v, np.float32)
            if a.shape != (r, r, r):
                raise ValueError(f"volume {i} has shape {a.shape}; this model takes ({r}, {r}, {r}) in model space")
            if latents is not None:
                if i >= len(latents):
                    raise ValueError(f"more volumes than latents ({len(latents)})")
                zs.append(latents[i].float().reshape(-1))
            else:
                kw = {} if encode_steps is None else {"steps": encode_steps}
                zs.append(model.encode(torch.from_numpy(a)[None, None], **kw)[0].float().detach())
            ys.append(measure_model_volume(a, cube, attribute))
            if progress:
                progress(i + 1, max(total, i + 1), "measure" if latents is not None else "encode and measure")
        if progress and total and len(ys) != total:  # the source skipped some (unreadable scans)
            progress(len(ys), len(ys), "measure" if latents is not None else "encode and measure")
        if latents is not None and len(zs) != len(latents):
            raise ValueError(f"{len(zs)} volumes for {len(latents)} latents")
        source = f"volumes n={len(ys)}" + ("" if latents is not None else " (encoded)")
    else:
        z_all = latents if latents is not None else model.sample_latents(n, seed)
        items = z_all.shape[0]
        for i in range(items):
            with torch.no_grad():
                vol = model.generate(z_all[i : i + 1])[0, 0].cpu().numpy()
            zs.append(z_all[i].float().reshape(-1))
            ys.append(measure_model_volume(vol, cfg, attribute))
            if progress:
                progress(i + 1, items, "generate and measure")
        source = "given latents" if latents is not None else f"sample seed={seed}"
    if not zs:
        raise ValueError("no volumes to fit a direction on")
    return fit_values(torch.stack(zs).cpu(), ys, attribute, name=name, ridge=ridge, source=source)


def load_directions(model_dir: str | os.PathLike) -> dict[str, Direction]:
    """The stored directions by name; {} when the model has none.  ModelDirError if unreadable."""
    f = Path(model_dir) / DIRECTIONS_NAME
    if not f.is_file():
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(f), framework="pt") as sf:
            meta = sf.metadata() or {}
            out = {}
            for k in sf.keys():
                if k not in meta:
                    raise ValueError(f"no metadata for direction {k!r}")
                m = json.loads(meta[k])
                vec = sf.get_tensor(k).float()
                if vec.ndim != 1:
                    raise ValueError(f"direction {k!r} has shape {tuple(vec.shape)}, expected [latent]")
                out[k] = Direction(
                    k,
                    str(m["attribute"]),
                    vec,
                    float(m["intercept"]),
                    float(m["r2"]),
                    None if m.get("r2_cv") is None else float(m["r2_cv"]),
                    int(m["n"]),
                    ridge=m.get("ridge"),
                    source=m.get("source"),
                )
            return out
    except Exception as e:
        raise ModelDirError(f"{f}: unreadable directions file ({e})") from e


def save_direction(model_dir: str | os.PathLike, direction: Direction) -> None:
    """Add or replace one direction in the model directory.  The file is replaced atomically, and
    concurrent savers are serialised (a lock on the directory), so none loses another's entry."""
    d = Path(model_dir)
    if not d.is_dir():
        raise ModelDirError(f"{d}: not a model directory")
    if direction.vector.ndim != 1 or not torch.isfinite(direction.vector).all():
        raise ValueError(f"direction {direction.name!r}: the vector must be 1-D and finite")
    fd = os.open(d, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        existing = load_directions(d)
        existing[direction.name] = direction
        tensors = {k: v.vector.float().contiguous() for k, v in existing.items()}
        meta = {k: json.dumps(v.meta()) for k, v in existing.items()}
        save_tensors_atomic(d / DIRECTIONS_NAME, tensors, meta)
    finally:
        os.close(fd)  # releases the lock


REFINE_TOLERANCE = 0.02  # ... until the measured value is within this fraction of the distance asked for
# a corrected step goes at most this many times the linear step from the start, or REFINE_REACH_MIN unit
# steps (3 standard deviations of the N(0, I) prior along the direction) where that is further: the
# linear step is tiny when the direction mispredicts the start
REFINE_REACH = 4.0
REFINE_REACH_MIN = 3.0


def reach_target(
    alpha0: float,
    target: float,
    measure: Callable[[float], float],
    rounds: int = REFINE_ROUNDS,
    slope: float | None = None,
) -> tuple[float, list[dict[str, float]]]:
    """Correct the linear model's step ``alpha0`` towards ``target`` by measuring the attribute of the
    volumes actually generated: ``measure(alpha)`` at 0 and at ``alpha0``, then up to ``rounds``
    secant steps on measured(alpha) - target, stopping once within ``REFINE_TOLERANCE`` of the distance
    from the start.  The direction's prediction grows along +alpha, so a secant whose slope does not
    (flat, or the measurement not monotonic there) is replaced by the bisection of the bracket where
    the target has been crossed; a step that goes further than ``REFINE_REACH`` times the linear step
    (or ``REFINE_REACH_MIN`` unit steps) is clipped.  The secant may turn back past the start: where
    the prediction at the start is off, the linear step can point away from the target.  Returns the
    alpha whose measured value was nearest the target among those tried, the start included (never
    further from it than the start or the linear step), and every ``{alpha, measured}`` tried, in
    order.

    ``slope``: the prediction's change per unit of alpha (the direction's norm).  Where the linear step
    is 0 (the prediction at the start equals the target) the first step is taken from the measured
    start instead, ``(target - measured) / slope``; without ``slope`` such a step stays 0."""
    if rounds < 0:
        raise ValueError(f"refine must be >= 0, got {rounds}")
    if rounds == 0 or (alpha0 == 0 and not slope):
        return alpha0, []
    tried = [{"alpha": 0.0, "measured": float(measure(0.0))}]
    if alpha0 == 0:
        alpha0 = (target - tried[0]["measured"]) / float(slope)  # type: ignore[arg-type]
        if alpha0 == 0 or not math.isfinite(alpha0):
            return 0.0, tried
    tried.append({"alpha": float(alpha0), "measured": float(measure(alpha0))})
    start = tried[0]["measured"]
    tol = REFINE_TOLERANCE * max(abs(target - start), 1e-12)
    reach = max(REFINE_REACH * abs(alpha0), REFINE_REACH_MIN)

    def err(t: dict[str, float]) -> float:
        return t["measured"] - target

    for _ in range(rounds):
        best = min(tried, key=lambda t: abs(err(t)))
        if abs(err(best)) <= tol:
            break
        a, b = tried[-2], tried[-1]
        slope = (b["measured"] - a["measured"]) / (b["alpha"] - a["alpha"]) if b["alpha"] != a["alpha"] else 0.0
        # the measured attribute must grow along +alpha, as the direction's prediction does
        guess = math.nan if slope <= 0 else b["alpha"] - err(b) / slope
        lo = [t for t in tried if err(t) < 0]
        hi = [t for t in tried if err(t) > 0]
        if lo and hi:  # a bracket: stay inside it
            x = max(lo, key=lambda t: t["measured"])["alpha"]
            y = min(hi, key=lambda t: t["measured"])["alpha"]
            if not (math.isfinite(guess) and min(x, y) < guess < max(x, y)):
                guess = (x + y) / 2
        elif not math.isfinite(guess):
            break  # no bracket and no usable slope: the linear step stands (or the nearest tried)
        guess = max(-reach, min(reach, guess))
        if any(abs(guess - t["alpha"]) < 1e-9 * max(1.0, abs(guess)) for t in tried):
            break
        tried.append({"alpha": float(guess), "measured": float(measure(guess))})
    best = min(tried, key=lambda t: abs(err(t)))
    return best["alpha"], tried


def traverse(
    model: Any,
    z0: torch.Tensor,
    direction: Direction,
    steps: list[float] | None = None,
    target: float | None = None,
    n_steps: int = 5,
    measure: Callable[[torch.Tensor], float] | None = None,
    refine: int = REFINE_ROUNDS,
) -> list[dict[str, Any]]:
    """Latents along the unit direction u = w/|w|: ``z0 + alpha*u``, one row
    ``{alpha, latent [1, latent], predicted}`` per step.  With ``target``, the alphas run evenly
    from 0 to ``alpha* = (target - predict(z0)) / |w|``, whose prediction equals the target; given
    ``measure`` (a latent's generated volume -> the attribute, as reported) and ``refine`` > 0, alpha*
    is corrected by ``reach_target`` so that the measured value ends at the target, and the last row
    holds ``refine``: the ``{alpha, measured}`` tried and ``alpha_linear``, the uncorrected step.
    ``model`` is not used (the caller generates); it is accepted for a uniform call."""
    w = direction.vector.float()
    norm = float(w.norm())
    if norm == 0 or not math.isfinite(norm):
        raise ValueError(f"direction {direction.name!r} is zero or not finite")
    u = w / norm
    z0 = z0.float().reshape(1, -1)
    if z0.shape[1] != w.shape[0]:
        raise ValueError(f"latent has {z0.shape[1]} values; the direction has {w.shape[0]}")
    if (steps is None) == (target is None):
        raise ValueError("give either steps (a list of alphas) or a target value")
    tried: list[dict[str, float]] = []
    if target is not None:
        if not math.isfinite(float(target)):
            raise ValueError(f"target must be a finite number, got {target}")
        if n_steps < 1:
            raise ValueError(f"n_steps must be at least 1, got {n_steps}")
        if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
            raise ValueError(f"refine must be an integer >= 0, got {refine!r}")
        alpha_linear = (float(target) - float(direction.predict(z0)[0])) / norm
        alpha_star = alpha_linear
        if measure is not None and refine > 0:
            alpha_star, tried = reach_target(
                alpha_linear, float(target), lambda a: measure(z0 + a * u), refine, slope=norm
            )
        # (+ 0.0: the start is 0.0, not -0.0, when the step is negative)
        steps = [alpha_star * i / (n_steps - 1) + 0.0 for i in range(n_steps)] if n_steps > 1 else [alpha_star]
    assert steps is not None
    if not steps or not all(math.isfinite(float(a)) for a in steps):
        raise ValueError("steps must be a non-empty list of finite numbers")
    out = []
    for a in steps:
        z = z0 + float(a) * u
        out.append({"alpha": float(a), "latent": z, "predicted": float(direction.predict(z)[0])})
    if tried:
        out[-1]["refine"] = {"alpha_linear": alpha_linear, "tried": tried}
    return out
