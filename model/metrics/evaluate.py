"""``voxgen evaluate``: how close a model's volumes are to a real prepared dataset.

The real set and the generated set are streamed in chunks of ``batch`` volumes, each brought to
the evaluation grid (the model's output shape unless ``grid`` says otherwise), so memory follows
the chunk size, not the number of samples.  From each chunk the evaluation keeps the features of
every extractor, the middle slices' 2D features, the MS-SSIM of every pair inside the chunk, the
chunk's mean volume (for the batch-wise MMD^2) and a few middle slices for the montage.

Figures (see the modules for the formulas):

* MMD^2 (Gaussian kernel, median-heuristic bandwidth from the real set, unbiased) and Frechet
  distance on each 3D feature set;
* batch-wise MMD^2 with the dot-product kernel (Kwon et al.; 3D-StyleGAN's bMMD^2) on the
  volumes themselves, batch = ``batch`` (8 as in Kwon et al.), on the evaluation grid
  area-averaged to at most 64 voxels per axis;
* slice-wise Frechet distance and MMD^2 on the middle axial, coronal and sagittal slices and their
  average, as Split&Shuffle reports FID-ax/-cor/-sag/-avg.  With ``inception`` (InceptionV3
  weights the user supplies, model/metrics/inception.py) the slice features are InceptionV3's
  2048-d pool3 features and the Frechet distances are FIDs; by default they are fixed pooled-pixel
  features (16 x 16), so the distances are not FIDs and the report says which;
* diversity: mean pairwise 3D MS-SSIM among generated and among real volumes;
* the same distances between two random halves of the real set (the floor a perfect model would
  reach with that many samples);
* reconstruction MAE through the model's own encoder, for families that have an amortised one.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.metrics.features import (
    AMORTISED_ENCODERS,
    PLANES,
    EncoderFeatures,
    PooledIntensity,
    PooledSlices,
    middle_slices,
    resample,
)
from model.metrics.frechet import frechet_distance
from model.metrics.inception import InceptionSlices
from model.metrics.mmd import batch_mmd2_from_means, median_bandwidth, mmd2
from model.metrics.msssim import pairwise_ms_ssim

Progress = Callable[[int, int, str], None]
BMMD_MAX_SIDE = 64
_FID_SUFFIX = {"axial": "ax", "coronal": "cor", "sagittal": "sag", "average": "avg"}  # Split&Shuffle's names
MONTAGE_ROWS = 8


class _SetStats:
    """What the evaluation keeps of one set (real or generated), chunk by chunk."""

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
        self.montage: list[dict[str, np.ndarray]] = []
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
            self.montage.append({p: mids[p][i].numpy() for p in PLANES})
        self.ms_ssim += pairwise_ms_ssim(x, self.max_pairs)
        small = resample(x, tuple(min(s, BMMD_MAX_SIDE) for s in x.shape[2:]))
        self.chunk_means.append((x.shape[0], small.flatten(1).double().mean(0)))

    def features(self) -> dict[str, torch.Tensor]:
        return {k: torch.cat(v) for k, v in self.feats.items()}

    def slice_feats(self) -> dict[str, torch.Tensor]:
        return {p: torch.cat(v) for p, v in self.slices.items()}


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


def _summary(vals: list[float]) -> dict[str, float | int]:
    t = torch.tensor(vals, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(t) > 1 else 0.0, "n": len(vals)}


def _distances(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], sigmas: dict[str, float]
) -> dict[str, dict[str, float]]:
    """MMD^2 (fixed bandwidths) and Frechet distance for each feature set; ``b`` is the real side."""
    out = {}
    for k in a:
        m, _ = mmd2(a[k], b[k], bandwidth=sigmas[k])
        out[k] = {"mmd2": m, "frechet": frechet_distance(a[k], b[k])}
    return out


def _slicewise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], sigmas: dict[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in PLANES:
        m, _ = mmd2(a[p], b[p], bandwidth=sigmas[p])
        out[p] = {"frechet": frechet_distance(a[p], b[p]), "mmd2": m}
    out["average"] = {k: float(np.mean([out[p][k] for p in PLANES])) for k in ("frechet", "mmd2")}
    return out


def load_model(model: Any, device: str | torch.device | None = None) -> tuple[Any, str | None]:
    """A model object, or a model directory loaded through the registry."""
    if isinstance(model, (str, os.PathLike)):
        from model.registry import from_pretrained, resolve_device

        return from_pretrained(model, device=resolve_device(str(device) if device else None)), str(model)
    return model, None


def evaluate(
    model: Any,
    real: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    n: int = 64,
    n_real: int | None = None,
    seed: int = 0,
    batch: int = 8,
    grid: tuple[int, int, int] | None = None,
    reference: str | os.PathLike | None = None,
    medicalnet: str | os.PathLike | None = None,
    inception: str | os.PathLike | None = None,
    ms_ssim_pairs: int | None = None,
    device: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` (directory or loaded model) against the prepared dataset ``real``.

    ``n`` generated volumes from ``model.sample_latents(n, seed)``; ``n_real`` real volumes (all by
    default; a seeded random subset otherwise).  With ``output`` the report (JSON + Markdown), the
    embedding plot and the montages are written there.  ``ms_ssim_pairs`` caps the MS-SSIM pairs
    per chunk (default: all ``batch * (batch - 1) / 2``; each pair costs about 1 s at 128^3 on one
    CPU core, 8x that at 256^3).  ``inception``: InceptionV3 weights (pytorch-fid's
    ``pt_inception-2015-12-05`` .pth, torchvision's ``inception_v3`` .pth, or .safetensors) for
    slice-wise FIDs; without it the slice-wise figures use pooled pixels.  Returns the report as a
    dict.
    """
    from model.data.datasets import VolumeDataset

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    m, model_path = load_model(model, device)
    shape = tuple(int(s) for s in m.output_shape)
    if min(shape) < 4:
        raise ValueError(f"the model's output {shape} is not a volume (a 2D model?); evaluate needs 3D volumes")
    grid = tuple(int(s) for s in (grid or shape))
    if len(grid) != 3 or min(grid) < 4:
        raise ValueError(f"grid must be three sizes >= 4, got {grid}")
    if batch < 2:
        raise ValueError("batch must be >= 2 (MS-SSIM pairs and batch MMD^2 are taken within a chunk)")
    if n < 4:
        raise ValueError("n must be >= 4 generated volumes")
    ds = VolumeDataset(real)
    if len(ds) < 4:
        raise ValueError(f"{real}: the real set needs at least 4 volumes, it has {len(ds)}")
    rng = np.random.default_rng(seed)
    order = [int(i) for i in rng.permutation(len(ds))]
    if n_real is not None:
        if n_real < 4:
            raise ValueError("n_real must be >= 4")
        order = order[:n_real]

    extractors: list[Any] = [PooledIntensity(8)]
    ref_info = None
    if reference is not None:
        ref, _ = load_model(reference, device)
        extractors.append(EncoderFeatures(ref, reference))
        ref_info = {"path": str(reference), "family": ref.family, "latent_dim": ref.latent_dim}
    if medicalnet is not None:
        from model.metrics.medicalnet import MedicalNetFeatures

        extractors.append(MedicalNetFeatures(medicalnet, device=device))
    primary = extractors[-1].name
    slice_fx = InceptionSlices(inception, device=device) if inception is not None else PooledSlices(16)

    # ---- real set
    t0 = time.perf_counter()
    real_stats = _SetStats(extractors, slice_fx, MONTAGE_ROWS, ms_ssim_pairs)
    for x in _real_chunks(ds, order, grid, batch, progress):
        real_stats.add(x)
    timings["real_s"] = time.perf_counter() - t0

    # ---- generated set
    t0 = time.perf_counter()
    gen_stats = _SetStats(extractors, slice_fx, MONTAGE_ROWS, ms_ssim_pairs)
    z = m.sample_latents(n, seed)
    for x in _generated_chunks(m, z, grid, batch, progress):
        gen_stats.add(x)
    timings["generate_and_features_s"] = time.perf_counter() - t0

    # ---- distances
    t0 = time.perf_counter()
    rf, gf = real_stats.features(), gen_stats.features()
    rs, gs = real_stats.slice_feats(), gen_stats.slice_feats()
    sig = {k: median_bandwidth(v) for k, v in rf.items()}
    sig_s = {p: median_bandwidth(v) for p, v in rs.items()}
    dist = _distances(gf, rf, sig)
    slicewise = _slicewise(gs, rs, sig_s)
    half = len(order) // 2
    floor = {
        "features": _distances({k: v[:half] for k, v in rf.items()}, {k: v[half:] for k, v in rf.items()}, sig),
        "slicewise": _slicewise({p: v[:half] for p, v in rs.items()}, {p: v[half:] for p, v in rs.items()}, sig_s),
        "halves": [half, len(order) - half],
    }
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
        bmmd["note"] = f"needs at least {batch} generated and {batch} real volumes"
    diversity = {
        "generated": _summary(gen_stats.ms_ssim) if gen_stats.ms_ssim else None,
        "real": _summary(real_stats.ms_ssim) if real_stats.ms_ssim else None,
        "pairs": (
            f"every pair within each chunk of {batch} consecutive volumes"
            if ms_ssim_pairs is None
            else f"up to {ms_ssim_pairs} pairs (nearest indices first) within each chunk of {batch} volumes"
        ),
    }
    timings["distances_s"] = time.perf_counter() - t0

    # ---- reconstruction through the model's own encoder
    recon = None
    if m.family in AMORTISED_ENCODERS:
        t0 = time.perf_counter()
        k = min(8, len(order))
        x = torch.from_numpy(np.stack([np.asarray(ds.volume(i), np.float32) for i in order[:k]]))[:, None]
        x = resample(x, shape)
        rec = m.generate(m.encode(x))
        recon = {"mae": float((rec - x).abs().mean()), "n": k, "space": "model space [-1, 1], output grid"}
        timings["reconstruction_s"] = time.perf_counter() - t0

    cfg = m.config.to_dict() if hasattr(m.config, "to_dict") else {}
    report: dict[str, Any] = {
        "voxgen_evaluate": 1,
        "model": {
            "path": model_path,
            "family": m.family,
            "output_shape": list(shape),
            "latent_dim": m.latent_dim,
            "modality": m.modality,
            "description": cfg.get("description", ""),
        },
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
            "seed": seed,
            "latents": f"model.sample_latents({n}, {seed})",
            "resampled_to": list(grid),
            "value_range": gen_stats.value_range,
        },
        "grid": list(grid),
        "batch": batch,
        "features": {e.name: e.description for e in extractors},
        "primary_features": primary,
        "reference_encoder": ref_info,
        "kernels": {
            "mmd2": "Gaussian exp(-|a-b|^2 / (2 sigma^2)), sigma = median pairwise distance among the real features; "
            "unbiased estimator (can be slightly negative); saturates for models far from the real set",
            "bmmd2": "dot-product kernel on flattened volumes, batch-wise, Kwon et al. 2019 (a sum over voxels)",
            "frechet": "Gaussian fit (mean, covariance) of each feature set; FID formula",
            "ms_ssim": "3D MS-SSIM, Gaussian window 11 (sigma 1.5), up to 5 scales, data range 2",
        },
        "bandwidths": {**sig, **{f"slice-{p}": v for p, v in sig_s.items()}},
        "metrics": {
            "features": dist,
            "slicewise": slicewise,
            "slice_features": slice_fx.description,
            "slice_feature_name": slice_fx.name,
            "bmmd2": bmmd,
            "ms_ssim": diversity,
            "reconstruction": recon,
        },
        "real_vs_real": floor,
        "timings": timings,
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": str(getattr(m, "device", "cpu")),
        },
    }
    report["timings"]["total_s"] = time.perf_counter() - t_start
    if output is not None:
        write_report(report, Path(output), real_stats, gen_stats, primary)
    return report


def write_report(report: dict[str, Any], out: Path, real: _SetStats, gen: _SetStats, primary: str) -> None:
    """report.json, report.md, embedding.png, montage_generated.png, montage_real.png and
    features.npz (the feature arrays, keys ``real/<name>`` and ``generated/<name>``) in ``out``."""
    from model.metrics.plots import embedding_plot, pca_2d, slice_montage

    out.mkdir(parents=True, exist_ok=True)
    pts, expl = pca_2d({"real": real.features()[primary].numpy(), "generated": gen.features()[primary].numpy()})
    embedding_plot(
        pts,
        out / "embedding.png",
        title=f"PCA of {primary} features: real vs generated",
        axis_labels=(f"PC1 ({100 * expl[0]:.0f}%)", f"PC2 ({100 * expl[1]:.0f}%)"),
    )
    slice_montage(gen.montage, out / "montage_generated.png")
    arrays = {f"real/{k}": v.numpy() for k, v in real.features().items()}
    arrays |= {f"generated/{k}": v.numpy() for k, v in gen.features().items()}
    np.savez(out / "features.npz", **arrays)  # plain arrays: np.load(..., allow_pickle=False)
    slice_montage(real.montage, out / "montage_real.png")
    report["files"] = {
        "embedding": "embedding.png",
        "montage_generated": "montage_generated.png",
        "montage_real": "montage_real.png",
        "features": "features.npz",
        "report_md": "report.md",
    }
    report["embedding"] = {"method": "PCA of standardised features (real and generated together)", "explained": expl}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))


def _f(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    return str(v)


def markdown(r: dict[str, Any]) -> str:
    """The report as Markdown: settings, then one table per figure."""
    mt, g, rl = r["metrics"], r["generated"], r["real"]
    lines = [
        f"# voxgen evaluate: {r['model']['path'] or r['model']['family']}",
        "",
        f"- model: family `{r['model']['family']}`, output {'x'.join(map(str, r['model']['output_shape']))}, "
        f"latent {r['model']['latent_dim']}, {r['model']['modality']}",
        f"- generated: n = {g['n']}, seed {g['seed']} (`{g['latents']}`)",
        f"- real: n = {rl['n']} of {rl['of']} from `{rl['path']}` (prepared at {rl['resolution']}^3)",
        f"- evaluation grid: {'x'.join(map(str, r['grid']))} ({rl['resampling']}); chunk size {r['batch']}",
        "",
        "## Distribution distances on 3D features (lower is closer)",
        "",
        "| features | MMD^2 | Frechet | real-vs-real MMD^2 | real-vs-real Frechet |",
        "|---|---|---|---|---|",
    ]
    for k, v in mt["features"].items():
        fl = r["real_vs_real"]["features"][k]
        lines.append(f"| {k} | {_f(v['mmd2'])} | {_f(v['frechet'])} | {_f(fl['mmd2'])} | {_f(fl['frechet'])} |")
    h = r["real_vs_real"]["halves"]
    lines += [
        "",
        f"Real vs real: two random halves of the real set ({h[0]} and {h[1]} volumes), the floor a perfect model "
        "would reach; with fewer samples per side it is a somewhat pessimistic floor for the Frechet distance.",
    ]
    lines += ["", "Features:"] + [f"- `{k}`: {d}" for k, d in r["features"].items()]
    fid = mt.get("slice_feature_name") == "slice-inception"
    fd = "FID" if fid else "Frechet"
    lines += [
        "",
        "## Slice-wise FID and MMD^2 (middle slices, InceptionV3 features)" if fid else "## Slice-wise (middle slices)",
        "",
        f"| plane | {fd} | MMD^2 | real-vs-real {fd} | real-vs-real MMD^2 |",
        "|---|---|---|---|---|",
    ]
    for p in (*PLANES, "average"):
        v, fl = mt["slicewise"][p], r["real_vs_real"]["slicewise"][p]
        row = f"{p} (FID-{_FID_SUFFIX[p]})" if fid else p
        lines.append(f"| {row} | {_f(v['frechet'])} | {_f(v['mmd2'])} | {_f(fl['frechet'])} | {_f(fl['mmd2'])} |")
    lines += ["", f"Slice features: {mt['slice_features']}.", ""]
    b = mt["bmmd2"]
    lines += ["## Batch-wise MMD^2 (Kwon et al.)", ""]
    if "mean" in b:
        rr = b.get("real_vs_real")
        lines.append(
            f"bMMD^2 = {_f(b['mean'])} +- {_f(b['std'])} over {b['n']} batches of {b['batch_size']} "
            f"(grid {'x'.join(map(str, b['grid']))})"
            + (f"; real vs real {_f(rr['mean'])} +- {_f(rr['std'])} ({rr['n']} batch pairs)" if rr else "")
        )
    else:
        lines.append(f"not computed: {b['note']}")
    d = mt["ms_ssim"]
    lines += [
        "",
        "## Diversity: mean pairwise 3D MS-SSIM (lower is more diverse)",
        "",
        "| set | MS-SSIM | std | pairs |",
        "|---|---|---|---|",
    ]
    for k in ("generated", "real"):
        if d[k]:
            lines.append(f"| {k} | {_f(d[k]['mean'])} | {_f(d[k]['std'])} | {d[k]['n']} |")
    lines.append(f"\nPairs: {d['pairs']}.")
    if mt["reconstruction"]:
        rc = mt["reconstruction"]
        lines += ["", f"## Reconstruction\n\nMAE of G(E(x)) on {rc['n']} real volumes: {_f(rc['mae'])} ({rc['space']})"]
    lines += ["", "## Kernels and estimators", ""] + [f"- {k}: {v}" for k, v in r["kernels"].items()]
    if "files" in r:
        lines += ["", "## Figures", "", "![embedding](embedding.png)", "", "![generated](montage_generated.png)"]
    lines += ["", f"Timings (s): {', '.join(f'{k} {v:.1f}' for k, v in r['timings'].items())}", ""]
    return "\n".join(lines)
