"""``voxgen evaluate``: how close a model's volumes (or a folder of anyone's volumes) are to a real
prepared dataset, with a real-vs-real floor taken at the same sample size.

The real set and the scored set are streamed in chunks of ``batch`` volumes, each brought to the
evaluation grid (the model's output shape, or the dataset's cube, unless ``grid`` says
otherwise), so memory follows the chunk size.  From each chunk the evaluation keeps the features
of every extractor, the middle slices' 2D features, the MS-SSIM of every pair inside the chunk, the
chunk's mean volume (for the batch-wise MMD^2) and a few middle slices for the montage.

Figures:

* the **headline**: the Frechet distance on the fixed texture bank (model/metrics/texture.py,
  standardised by the real set), ``fd_texture``; features never come from the model judged;
* for every feature set (texture, pooled voxels, optional reference encoder / MedicalNet, the
  middle slices of each plane) the Frechet distance and KID (unbiased polynomial-kernel MMD^2);
* the **floor**: both statistics between two disjoint random subsets of the real set of the same
  size m as the scored set, over ``floor_splits`` random splits (mean and standard deviation);
  the scored set is compared with the first subset of each split, so every distance and its
  floor are taken at m vs m (m = n when the real set has at least 2n volumes) and the reported
  distance is the mean over the splits, its ``_sd`` the spread over them;
* batch-wise MMD^2 with the dot-product kernel (Kwon et al.; 3D-StyleGAN's bMMD^2);
* diversity: mean pairwise 3D MS-SSIM among scored and among real volumes, and the spread of the
  scored volumes' coarse anatomy (voxels pooled to 4^3) relative to the real ones'; ``warnings``
  says "mode collapse" when that spread is under ``COLLAPSE_SPREAD``, "low diversity" when only
  MS-SSIM is higher than the real set's by more than ``COLLAPSE_MS_SSIM_MARGIN``;
* reconstruction MAE through the model's own encoder (families with an amortised one), beside the
  MAE of the best constant volume (the voxel-wise median of the same real volumes).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.base import Progress
from model.data.grid import resample
from model.latent import fit_steps_problem
from model.metrics.features import (
    AMORTISED_ENCODERS,
    PLANES,
    EncoderFeatures,
    PooledIntensity,
    PooledSlices,
    middle_slices,
)
from model.metrics.frechet import frechet_distance
from model.metrics.inception import InceptionSlices
from model.metrics.mmd import batch_mmd2_from_means, kid
from model.metrics.msssim import pairwise_ms_ssim
from model.metrics.texture import TextureBank
from model.preview import display_planes, montage, save_png, to_uint8

BMMD_MAX_SIDE = 64
_FID_SUFFIX = {"axial": "ax", "coronal": "cor", "sagittal": "sag", "average": "avg"}  # Split&Shuffle's names
MONTAGE_ROWS = 8
HEADLINE = ("texture", "fd")  # feature set, statistic
FLOOR_SPLITS = 20
# low diversity: scored volumes more alike than real ones by this much mean MS-SSIM; collapse: the
# spread (total variance) of their coarse anatomy under this fraction of the real set's.  Two sets of
# 16 augmented templates differ by up to 2x in that spread (benchmarks/RESULTS.md), hence a quarter.
COLLAPSE_MS_SSIM_MARGIN = 0.05
COLLAPSE_SPREAD = 0.25
Z_CLIP = 10.0
POOLED = 8
SAMPLE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".npy", ".zip")


class _SetStats:
    """What the evaluation keeps of one set (real or scored), chunk by chunk."""

    def __init__(
        self,
        extractors: list[Any],
        slice_features: PooledSlices | InceptionSlices,
        montage_rows: int,
        max_pairs: int | None = None,
    ) -> None:
        self.max_pairs = max_pairs
        self.extractors = extractors
        self.slice_features = slice_features
        self.feats: dict[str, list[torch.Tensor]] = {e.name: [] for e in extractors}
        self.slices: dict[str, list[torch.Tensor]] = {p: [] for p in PLANES}
        self.ms_ssim: list[float] = []
        self.chunk_means: list[tuple[int, torch.Tensor]] = []
        self.montage: list[list[np.ndarray]] = []  # display tiles (model/preview.py) per row
        self.montage_rows = montage_rows
        self.n = 0
        self.value_range = [float("inf"), float("-inf")]

    def add(self, x: torch.Tensor) -> None:
        x = x.float().cpu()
        self.n += x.shape[0]
        self.value_range = [min(self.value_range[0], float(x.min())), max(self.value_range[1], float(x.max()))]
        for e in self.extractors:
            self.feats[e.name].append(e(x))
        mids = middle_slices(x)
        for p in PLANES:
            self.slices[p].append(self.slice_features(mids[p]))
        for i in range(min(x.shape[0], self.montage_rows - len(self.montage))):
            self.montage.append([to_uint8(p) for p in display_planes(x[i, 0].numpy())])
        self.ms_ssim += pairwise_ms_ssim(x, self.max_pairs)
        small = resample(x, tuple(min(s, BMMD_MAX_SIDE) for s in x.shape[2:]))
        self.chunk_means.append((x.shape[0], small.flatten(1).double().mean(0)))

    def features(self) -> dict[str, torch.Tensor]:
        """Every feature set, the middle slices' as ``<slice features>-<plane>``."""
        out = {k: torch.cat(v) for k, v in self.feats.items()}
        return out | {f"{self.slice_features.name}-{p}": torch.cat(v) for p, v in self.slices.items()}


def _real_chunks(
    ds: Any, order: list[int], grid: tuple[int, int, int], batch: int, progress: Progress | None
) -> Iterator[torch.Tensor]:
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        x = torch.from_numpy(np.stack([np.asarray(ds.volume(i), np.float32) for i in idx]))[:, None]
        yield resample(x, grid)
        if progress:
            progress(min(len(order), s + batch), len(order), "real")


def _generated_chunks(
    model: Any, z: torch.Tensor, grid: tuple[int, int, int], batch: int, progress: Progress | None
) -> Iterator[torch.Tensor]:
    n = z.shape[0]
    for s in range(0, n, batch):
        v = model.generate(z[s : s + batch])
        yield resample(v.float().cpu().clamp(-1, 1), grid)
        if progress:
            progress(min(n, s + batch), n, "generate")


def find_samples(folder: str | os.PathLike) -> list[Path]:
    """The volumes of a samples folder: files ``encode`` reads (NIfTI, NRRD, MHA, a zip of a DICOM
    series), ``.npy`` model-space arrays (``voxgen generate -o x.npy``) and DICOM series folders."""
    from model.data.datasets import find_scans

    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{root}: --samples must be a folder of volumes")
    files = [p for p in find_scans(root) if p.is_dir() or p.name.lower().endswith(SAMPLE_SUFFIXES)]
    files += sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith((".npy", ".zip")))
    files = sorted(set(files))
    if len(files) < 4:
        raise ValueError(f"{root}: needs at least 4 volumes to score, found {len(files)}")
    return files


def _load_sample(path: Path, config: Any) -> np.ndarray:
    """One sample in model space: a ``.npy`` array as it is (3D, values in [-1, 1]); anything else
    through the same reading and preprocessing as the real set (``prepare``)."""
    from model.data.volumes import VolumeError, load_for_model

    if path.is_file() and path.name.lower().endswith(".npy"):
        try:
            a = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise VolumeError(f"{path.name}: not a readable .npy array ({e})") from None
        a = np.squeeze(np.asarray(a, np.float32))
        if a.ndim != 3 or min(a.shape) < 4:
            raise VolumeError(f"{path.name}: expected a 3D model-space array, got shape {list(a.shape)}")
        if not np.isfinite(a).all():
            raise VolumeError(f"{path.name}: contains NaN or infinite values")
        return np.clip(a, -1.0, 1.0)
    return load_for_model(path, config)


def _sample_chunks(
    files: list[Path], config: Any, grid: tuple[int, int, int], batch: int, progress: Progress | None
) -> Iterator[torch.Tensor]:
    from model.data.volumes import VolumeError

    for s in range(0, len(files), batch):
        vols = []
        for p in files[s : s + batch]:
            try:
                v = torch.from_numpy(_load_sample(p, config))[None, None]
            except VolumeError as e:
                raise ValueError(f"--samples: {p.name}: {e}") from None
            vols.append(resample(v, grid))
        yield torch.cat(vols)
        if progress:
            progress(min(len(files), s + batch), len(files), "samples")


def _summary(vals: list[float]) -> dict[str, float | int]:
    t = torch.tensor(vals, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(t) > 1 else 0.0, "n": len(vals)}


def _mean_sd(vals: list[float]) -> dict[str, float]:
    s = _summary(vals)
    return {"mean": s["mean"], "sd": s["std"]}


def standardise(real: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Winsorised z-scores by the real set's per-feature mean and standard deviation: the sd is
    floored at 1e-3 (the features are O(0.01-1); a feature that hardly varies among the real
    volumes, such as an empty histogram bin, must not turn a small change into an astronomic
    score) and scores are clipped at +-Z_CLIP real standard deviations, so no single feature can
    dominate a distance: a feature that far out counts as far, however far."""
    mu, sd = real.double().mean(0), real.double().std(0).clamp_min(1e-3)
    return [((x.double() - mu) / sd).clamp(-Z_CLIP, Z_CLIP).float() for x in (real, *others)]


def split_distances(
    scored: dict[str, torch.Tensor], real: dict[str, torch.Tensor], m: int, splits: int, seed: int
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, dict[str, float]]]]:
    """Distances at m vs m with their real-vs-real floor, over ``splits`` random splits.

    Each split draws two disjoint subsets A and B of m real volumes (and m of the scored volumes
    when there are more); per feature set it takes FD and KID of (scored, A) and of (A, B).
    Returns ``distances[k] = {fd, fd_sd, kid, kid_sd}`` (mean and spread over the splits) and
    ``floor[k] = {fd: {mean, sd}, kid: {mean, sd}}``."""
    n_real = len(next(iter(real.values())))
    n_scored = len(next(iter(scored.values())))
    if m < 2 or 2 * m > n_real or m > n_scored:
        raise ValueError(f"cannot split {n_real} real and {n_scored} scored volumes at m = {m}")
    rng = np.random.default_rng(seed)
    vals: dict[str, dict[str, list[float]]] = {k: {"fd": [], "kid": [], "ffd": [], "fkid": []} for k in real}
    for _ in range(splits):
        perm = rng.permutation(n_real)
        a, b = torch.from_numpy(perm[:m]), torch.from_numpy(perm[m : 2 * m])
        g = torch.from_numpy(rng.permutation(n_scored)[:m]) if n_scored > m else torch.arange(n_scored)
        for k, r in real.items():
            ra, rb, sg = r[a], r[b], scored[k][g]
            vals[k]["fd"].append(frechet_distance(sg, ra))
            vals[k]["kid"].append(kid(sg, ra))
            vals[k]["ffd"].append(frechet_distance(ra, rb))
            vals[k]["fkid"].append(kid(ra, rb))
    distances, floor = {}, {}
    for k, v in vals.items():
        fd, kd = _mean_sd(v["fd"]), _mean_sd(v["kid"])
        distances[k] = {"fd": fd["mean"], "fd_sd": fd["sd"], "kid": kd["mean"], "kid_sd": kd["sd"]}
        floor[k] = {"fd": _mean_sd(v["ffd"]), "kid": _mean_sd(v["fkid"])}
    return distances, floor


def load_model(model: Any, device: str | torch.device | None = None) -> tuple[Any, str | None]:
    """A model object, or a model directory loaded through the registry."""
    if isinstance(model, (str, os.PathLike)):
        from model.registry import from_pretrained, resolve_device

        return from_pretrained(model, device=resolve_device(str(device) if device else None)), str(model)
    return model, None


def spread_ratio(scored: torch.Tensor, real: torch.Tensor) -> float:
    """Total variance of the scored features over the real ones' (1: as varied as real data; a
    generator that ignores its latent: 0).  On volumes pooled to 4^3 it is the collapse figure."""
    return float(scored.double().var(0).sum() / real.double().var(0).sum().clamp_min(1e-12))


def _collapse_warnings(div: dict[str, Any]) -> list[str]:
    """Collapse is judged on anatomy, not texture: the spread (total variance) of the scored
    volumes' pooled voxels against the real set's.  Blur leaves that spread alone but raises MS-SSIM
    among volumes, so an MS-SSIM excess alone is reported as low diversity, not as collapse."""
    out = []
    g, r, spread = div["ms_ssim_generated"], div["ms_ssim_real"], div["pooled_spread_ratio"]
    if spread is not None and spread < COLLAPSE_SPREAD:
        out.append(
            f"mode collapse: the scored volumes vary {spread:.2f}x as much as the real ones (total variance of "
            f"their voxels pooled to {POOLED // 2}^3; under {COLLAPSE_SPREAD}); MS-SSIM among them "
            + (f"{g:.3f} vs {r:.3f} among real volumes" if g is not None and r is not None else "not measured")
        )
    elif g is not None and r is not None and g - r > COLLAPSE_MS_SSIM_MARGIN:
        out.append(
            f"low diversity: the scored volumes are more alike than real ones by MS-SSIM ({g:.3f} vs {r:.3f}; "
            f"more than {COLLAPSE_MS_SSIM_MARGIN} apart), though their anatomy varies as much (MS-SSIM also "
            "rises when volumes are blurred: see the texture distances)"
        )
    return out


def evaluate(
    model: Any,
    real: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    samples: str | os.PathLike | None = None,
    n: int = 64,
    n_real: int | None = None,
    seed: int = 0,
    batch: int = 8,
    grid: tuple[int, int, int] | None = None,
    reference: str | os.PathLike | None = None,
    medicalnet: str | os.PathLike | None = None,
    inception: str | os.PathLike | None = None,
    ms_ssim_pairs: int | None = None,
    floor_splits: int = FLOOR_SPLITS,
    device: str | None = None,
    progress: Progress | None = None,
    encode_steps: int | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` (directory or loaded model), or the volumes in the folder ``samples`` (with
    ``model=None``), against the prepared dataset ``real``.

    ``n`` generated volumes from ``model.sample_latents(n, seed)``, or every volume in ``samples``
    (read like ``encode`` reads a scan, with the real set's preprocessing; ``.npy`` files are taken
    as model-space arrays).  ``n_real`` real volumes (all by default; a seeded random subset
    otherwise): at least twice the scored count for a floor at the same size.  With ``output`` the
    report (JSON + Markdown), the embedding plot and the montages are written there.
    ``ms_ssim_pairs`` caps the MS-SSIM pairs per chunk (default: all ``batch * (batch - 1) / 2``;
    each pair costs about 1 s at 128^3 on one CPU core).  ``inception``: InceptionV3 weights for
    slice-wise FIDs; without it the slice-wise figures use pooled pixels.  Returns the report.
    """
    from model.data.datasets import VolumeDataset

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if (model is None) == (samples is None):
        raise ValueError("give a model or a samples folder (exactly one)")
    ds = VolumeDataset(real)
    if len(ds) < 4:
        raise ValueError(f"{real}: the real set needs at least 4 volumes, it has {len(ds)}")
    files: list[Path] = []
    m, model_path = (None, None)
    if samples is not None:
        files = find_samples(samples)
        shape = (ds.resolution,) * 3
        n = len(files)
    else:
        m, model_path = load_model(model, device)
        shape = tuple(int(s) for s in m.output_shape)
        if min(shape) < 4:
            raise ValueError(f"the model's output {shape} is not a volume (a 2D model?); evaluate needs 3D volumes")
        if n < 4:
            raise ValueError("n must be >= 4 generated volumes")
    if encode_steps is not None:  # the reconstruction figure's fit: refused now, not after the distances
        if m is None or m.family not in AMORTISED_ENCODERS:
            kinds = ", ".join(sorted(AMORTISED_ENCODERS))
            raise ValueError(f"encode_steps is for a model with an amortised encoder ({kinds}); it has no effect here")
        if problem := fit_steps_problem(encode_steps, m.family, projection=False):
            raise ValueError(f"encode_{problem}")
    grid = tuple(int(s) for s in (grid or shape))
    if len(grid) != 3 or min(grid) < 4:
        raise ValueError(f"grid must be three sizes >= 4, got {grid}")
    if batch < 2:
        raise ValueError("batch must be >= 2 (MS-SSIM pairs and batch MMD^2 are taken within a chunk)")
    if floor_splits < 2:
        raise ValueError("floor_splits must be >= 2")
    rng = np.random.default_rng(seed)
    order = [int(i) for i in rng.permutation(len(ds))]
    if n_real is not None:
        if n_real < 4:
            raise ValueError("n_real must be >= 4")
        order = order[:n_real]
    warnings: list[str] = []
    size = min(n, len(order) // 2)
    if size < n:
        warnings.append(
            f"the real set has {len(order)} volumes: distances and their floor are taken at {size} vs {size} "
            f"(scoring all {n} at {n} vs {n} needs {2 * n} real volumes)"
        )

    extractors: list[Any] = [TextureBank(), PooledIntensity(POOLED)]
    ref_info = None
    if reference is not None:
        ref, _ = load_model(reference, device)
        extractors.append(EncoderFeatures(ref, reference))
        ref_info = {"path": str(reference), "family": ref.family, "latent_dim": ref.latent_dim}
        if model_path is not None and Path(reference).resolve() == Path(model_path).resolve():
            warnings.append(
                "the reference encoder is the model being judged: its features favour its own samples; "
                "compare models with one fixed reference, or rely on the texture headline"
            )
    if medicalnet is not None:
        from model.metrics.medicalnet import MedicalNetFeatures

        extractors.append(MedicalNetFeatures(medicalnet, device=device))
    slice_fx = InceptionSlices(inception, device=device) if inception is not None else PooledSlices(16)

    # ---- real set
    t0 = time.perf_counter()
    real_stats = _SetStats(extractors, slice_fx, MONTAGE_ROWS, ms_ssim_pairs)
    for x in _real_chunks(ds, order, grid, batch, progress):
        real_stats.add(x)
    timings["real_s"] = time.perf_counter() - t0

    # ---- scored set
    t0 = time.perf_counter()
    gen_stats = _SetStats(extractors, slice_fx, MONTAGE_ROWS, ms_ssim_pairs)
    if m is not None:
        z = m.sample_latents(n, seed)
        chunks = _generated_chunks(m, z, grid, batch, progress)
    else:
        # scans read as the real set was prepared (its cube: spacing, intensity, preprocessing)
        chunks = _sample_chunks(files, ds.cube(), grid, batch, progress)
    for x in chunks:
        gen_stats.add(x)
    timings["generate_and_features_s"] = time.perf_counter() - t0

    # ---- distances at the same sample size, with their floor
    t0 = time.perf_counter()
    rf, gf = real_stats.features(), gen_stats.features()
    for e in extractors:
        if getattr(e, "standardise", False):
            rf[e.name], gf[e.name] = standardise(rf[e.name], gf[e.name])
    distances, floors = split_distances(gf, rf, size, floor_splits, seed)
    for k in distances:
        distances[k]["floor"] = floors[k]
    slice_keys = {p: f"{slice_fx.name}-{p}" for p in PLANES}
    slicewise: dict[str, Any] = {p: distances[k] | {"features": k} for p, k in slice_keys.items()}
    slicewise["average"] = {
        st: float(np.mean([distances[k][st] for k in slice_keys.values()])) for st in ("fd", "kid")
    } | {"floor_fd": float(np.mean([floors[k]["fd"]["mean"] for k in slice_keys.values()]))}

    hf, hs = HEADLINE
    hfl = floors[hf][hs]
    headline = {
        "name": f"{hs}_{hf}",
        "value": distances[hf][hs],
        "floor_mean": hfl["mean"],
        "floor_sd": hfl["sd"],
        "z": (distances[hf][hs] - hfl["mean"]) / hfl["sd"] if hfl["sd"] > 0 else None,
        "n": size,
    }
    floor = {"name": headline["name"], "mean": hfl["mean"], "sd": hfl["sd"], "n": size, "splits": floor_splits}

    full_g = [mu for b, mu in gen_stats.chunk_means if b == batch]
    full_r = [mu for b, mu in real_stats.chunk_means if b == batch]
    bmmd: dict[str, Any] = {"batch_size": batch, "grid": [min(s, BMMD_MAX_SIDE) for s in grid]}
    if full_g and full_r:
        vals = batch_mmd2_from_means((g, full_r[i % len(full_r)]) for i, g in enumerate(full_g))
        bmmd |= _summary(vals)
        if len(full_r) >= 2:
            rr = batch_mmd2_from_means((full_r[i], full_r[i + 1]) for i in range(0, len(full_r) - 1, 2))
            bmmd["real_vs_real"] = _summary(rr)
    else:
        bmmd["note"] = f"needs at least {batch} scored and {batch} real volumes"

    def coarse(f: torch.Tensor) -> torch.Tensor:  # pooled 8^3 -> 4^3: gross anatomy only
        return torch.nn.functional.avg_pool3d(f.view(-1, 1, POOLED, POOLED, POOLED), 2).flatten(1)

    diversity = {
        "ms_ssim_generated": float(np.mean(gen_stats.ms_ssim)) if gen_stats.ms_ssim else None,
        "ms_ssim_real": float(np.mean(real_stats.ms_ssim)) if real_stats.ms_ssim else None,
        "ms_ssim_generated_sd": float(np.std(gen_stats.ms_ssim, ddof=1)) if len(gen_stats.ms_ssim) > 1 else None,
        "ms_ssim_real_sd": float(np.std(real_stats.ms_ssim, ddof=1)) if len(real_stats.ms_ssim) > 1 else None,
        "pairs_generated": len(gen_stats.ms_ssim),
        "pairs_real": len(real_stats.ms_ssim),
        "pooled_spread_ratio": spread_ratio(coarse(gf[f"pooled{POOLED}"]), coarse(rf[f"pooled{POOLED}"])),
        "texture_spread_ratio": spread_ratio(gf[hf], rf[hf]),
        "pairs": (
            f"every pair within each chunk of {batch} consecutive volumes"
            if ms_ssim_pairs is None
            else f"up to {ms_ssim_pairs} pairs (nearest indices first) within each chunk of {batch} volumes"
        ),
    }
    warnings += _collapse_warnings(diversity)
    timings["distances_s"] = time.perf_counter() - t0

    # ---- reconstruction through the model's own encoder, beside the best constant volume
    recon = None
    if m is not None and m.family in AMORTISED_ENCODERS:
        t0 = time.perf_counter()
        k = min(8, len(order))
        x = torch.from_numpy(np.stack([np.asarray(ds.volume(i), np.float32) for i in order[:k]]))[:, None]
        x = resample(x, shape)
        steps = int(getattr(m.config, "encode_steps", 0) if encode_steps is None else encode_steps)
        rec = m.generate(m.encode(x, steps=steps))  # (the amortised families' encode takes steps)
        mae = float((rec - x).abs().mean())
        const = float((x.median(0, keepdim=True).values - x).abs().mean())
        recon = {
            "mae": mae,
            "mae_constant": const,
            "ratio_to_constant": mae / const if const > 0 else None,
            "n": k,
            "space": "model space [-1, 1], output grid",
            "constant": "the voxel-wise median of the same real volumes (the best single volume for L1)",
            "encode_steps": steps,  # latent-fit steps after the encoder (encode --steps, or the model's default)
        }
        timings["reconstruction_s"] = time.perf_counter() - t0

    cfg = m.config.to_dict() if m is not None and hasattr(m.config, "to_dict") else {}
    report: dict[str, Any] = {
        "voxgen_evaluate": 2,
        "headline": headline,
        "floor": floor,
        "distances": distances,
        "diversity": diversity,
        "warnings": warnings,
        "model": None
        if m is None
        else {
            "path": model_path,
            "family": m.family,
            "output_shape": list(shape),
            "latent_dim": m.latent_dim,
            "modality": m.modality,
            "description": cfg.get("description", ""),
        },
        "samples": None if samples is None else {"path": str(samples), "n": n, "files": [p.name for p in files]},
        "real": {
            "path": str(real),
            "n": len(order),
            "of": len(ds),
            "resolution": ds.resolution,
            "resampled_to": list(grid),
            "resampling": "area averaging for integer down-scaling, else trilinear",
            "subset_seed": seed if n_real is not None else None,
        },
        "generated": {
            "n": n,
            "seed": seed if m is not None else None,
            "latents": f"model.sample_latents({n}, {seed})" if m is not None else f"the files of {samples}",
            "resampled_to": list(grid),
            "value_range": gen_stats.value_range,
        },
        "grid": list(grid),
        "batch": batch,
        "features": {e.name: e.description for e in extractors} | {slice_fx.name: slice_fx.description},
        "primary_features": HEADLINE[0],
        "reference_encoder": ref_info,
        "kernels": {
            "fd": "Frechet distance: Gaussian fit (mean, covariance) of each feature set; the FID formula",
            "kid": "KID: unbiased MMD^2 with the polynomial kernel (a.b / d + 1)^3 (Binkowski et al. 2018)",
            "floor": f"FD and KID between two disjoint random subsets of {size} real volumes, over {floor_splits} "
            f"random splits; each scored distance is against the first subset of every split (mean, sd)",
            "bmmd2": "dot-product kernel on flattened volumes, batch-wise, Kwon et al. 2019 (a sum over voxels)",
            "ms_ssim": "3D MS-SSIM, Gaussian window 11 (sigma 1.5), up to 5 scales, data range 2",
        },
        "metrics": {
            "slicewise": slicewise,
            "slice_features": slice_fx.description,
            "slice_feature_name": slice_fx.name,
            "bmmd2": bmmd,
            "reconstruction": recon,
        },
        "timings": timings,
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": str(getattr(m, "device", "cpu")),
        },
    }
    report["timings"]["total_s"] = time.perf_counter() - t_start
    if output is not None:
        write_report(report, Path(output), rf, gf, real_stats, gen_stats)
    return report


def write_report(
    report: dict[str, Any],
    out: Path,
    real_feats: dict[str, torch.Tensor],
    gen_feats: dict[str, torch.Tensor],
    real: _SetStats,
    gen: _SetStats,
) -> None:
    """report.json, report.md, embedding.png, montage_generated.png, montage_real.png and
    features.npz (the feature arrays as scored, keys ``real/<name>`` and ``generated/<name>``)."""
    from model.metrics.plots import embedding_plot, pca_2d

    primary = report["primary_features"]
    out.mkdir(parents=True, exist_ok=True)
    pts, expl = pca_2d({"real": real_feats[primary].numpy(), "generated": gen_feats[primary].numpy()})
    embedding_plot(
        pts,
        out / "embedding.png",
        title=f"PCA of {primary} features: real vs scored",
        axis_labels=(f"PC1 ({100 * expl[0]:.0f}%)", f"PC2 ({100 * expl[1]:.0f}%)"),
    )
    save_png(montage(gen.montage), out / "montage_generated.png")
    arrays = {f"real/{k}": v.numpy() for k, v in real_feats.items()}
    arrays |= {f"generated/{k}": v.numpy() for k, v in gen_feats.items()}
    np.savez(out / "features.npz", **arrays)  # plain arrays: np.load(..., allow_pickle=False)
    save_png(montage(real.montage), out / "montage_real.png")
    report["files"] = {
        "embedding": "embedding.png",
        "montage_generated": "montage_generated.png",
        "montage_real": "montage_real.png",
        "features": "features.npz",
        "report_md": "report.md",
    }
    report["embedding"] = {"method": "PCA of standardised features (real and scored together)", "explained": expl}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))


def _f(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    return str(v)


def markdown(r: dict[str, Any]) -> str:
    """The report as Markdown: the headline and its floor, warnings, then one table per figure."""
    mt, g, rl, h = r["metrics"], r["generated"], r["real"], r["headline"]
    what = (
        f"model `{r['model']['path'] or r['model']['family']}`" if r["model"] else f"samples `{r['samples']['path']}`"
    )
    lines = [f"# voxgen evaluate: {what}", ""]
    if r["model"]:
        md = r["model"]
        lines.append(
            f"- model: family `{md['family']}`, output {'x'.join(map(str, md['output_shape']))}, "
            f"latent {md['latent_dim']}, {md['modality']}"
        )
    lines += [
        f"- scored: n = {g['n']} ({g['latents']})",
        f"- real: n = {rl['n']} of {rl['of']} from `{rl['path']}` (prepared at {rl['resolution']}^3)",
        f"- evaluation grid: {'x'.join(map(str, r['grid']))} ({rl['resampling']}); chunk size {r['batch']}",
        "",
        f"**Headline: {h['name']} = {_f(h['value'])}**; real-vs-real floor {_f(h['floor_mean'])} +- "
        f"{_f(h['floor_sd'])} at the same size ({h['n']} vs {h['n']}, {r['floor']['splits']} splits)"
        + (f"; {h['z']:.1f} floor standard deviations above it" if h["z"] is not None else ""),
        "",
    ]
    if r["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in r["warnings"]] + [""]
    lines += [
        "## Distances (lower is closer), each beside its real-vs-real floor",
        "",
        "| features | FD | FD sd | floor FD | floor sd | KID | KID sd | floor KID | floor sd |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k, v in r["distances"].items():
        fl = v["floor"]
        lines.append(
            f"| {k} | {_f(v['fd'])} | {_f(v['fd_sd'])} | {_f(fl['fd']['mean'])} | {_f(fl['fd']['sd'])} | "
            f"{_f(v['kid'])} | {_f(v['kid_sd'])} | {_f(fl['kid']['mean'])} | {_f(fl['kid']['sd'])} |"
        )
    lines += ["", f"Floor and sd: {r['kernels']['floor']}.", "", "Features:"]
    lines += [f"- `{k}`: {d}" for k, d in r["features"].items()]
    fid = mt.get("slice_feature_name") == "slice-inception"
    fd = "FID" if fid else "FD"
    lines += [
        "",
        "## Slice-wise (middle slices" + (", InceptionV3 features: FIDs)" if fid else ", pooled pixels: not FIDs)"),
        "",
        f"| plane | {fd} | floor {fd} | KID |",
        "|---|---|---|---|",
    ]
    for p in PLANES:
        v = mt["slicewise"][p]
        row = f"{p} ({fd}-{_FID_SUFFIX[p]})" if fid else p
        lines.append(f"| {row} | {_f(v['fd'])} | {_f(v['floor']['fd']['mean'])} | {_f(v['kid'])} |")
    av = mt["slicewise"]["average"]
    row = f"average ({fd}-avg)" if fid else "average"
    lines.append(f"| {row} | {_f(av['fd'])} | {_f(av['floor_fd'])} | {_f(av['kid'])} |")
    b = mt["bmmd2"]
    lines += ["", "## Batch-wise MMD^2 (Kwon et al.)", ""]
    if "mean" in b:
        rr = b.get("real_vs_real")
        lines.append(
            f"bMMD^2 = {_f(b['mean'])} +- {_f(b['std'])} over {b['n']} batches of {b['batch_size']} "
            f"(grid {'x'.join(map(str, b['grid']))})"
            + (f"; real vs real {_f(rr['mean'])} +- {_f(rr['std'])} ({rr['n']} batch pairs)" if rr else "")
        )
    else:
        lines.append(f"not computed: {b['note']}")
    d = r["diversity"]
    lines += [
        "",
        "## Diversity (lower MS-SSIM is more diverse)",
        "",
        "| set | mean pairwise MS-SSIM | sd | pairs |",
        "|---|---|---|---|",
        f"| scored | {_f(d['ms_ssim_generated'])} | {_f(d['ms_ssim_generated_sd'])} | {d['pairs_generated']} |",
        f"| real | {_f(d['ms_ssim_real'])} | {_f(d['ms_ssim_real_sd'])} | {d['pairs_real']} |",
        "",
        f"Pairs: {d['pairs']}. Spread of the scored set against the real set's (total variance): pooled voxels "
        f"{_f(d['pooled_spread_ratio'])}x, texture features {_f(d['texture_spread_ratio'])}x.",
    ]
    if mt["reconstruction"]:
        rc = mt["reconstruction"]
        lines += [
            "",
            "## Reconstruction",
            "",
            f"MAE of G(E(x)) on {rc['n']} real volumes"
            + (f", each latent fitted by {k} steps after the encoder" if (k := rc.get("encode_steps")) else "")
            + f": {_f(rc['mae'])} ({rc['space']}); the best constant volume "
            f"({rc['constant']}): {_f(rc['mae_constant'])}; ratio {_f(rc['ratio_to_constant'])}.",
        ]
    lines += ["", "## Estimators", ""] + [f"- {k}: {v}" for k, v in r["kernels"].items()]
    if "files" in r:
        lines += ["", "## Figures", "", "![embedding](embedding.png)", "", "![scored](montage_generated.png)"]
        lines += ["", "![real](montage_real.png)"]
    lines += ["", f"Timings (s): {', '.join(f'{k} {v:.1f}' for k, v in r['timings'].items())}", ""]
    return "\n".join(lines)
