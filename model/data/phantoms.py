"""Synthetic scans for tests and demos (no downloads): a CT-like chest and a T1-like head.

Arrays are indexed (z, y, x) = (D, H, W) in RAS+ order (x towards the patient's Right, y
Anterior, z Superior), in physical units: CT in Hounsfield units, MRI in arbitrary units >= 0.
Each phantom is asymmetric along every axis (heart on the left, spine posterior, lungs above
the diaphragm; ventricles and a lesion off-centre), so an orientation mistake changes the array.
A seed jitters sizes and positions by a few percent and draws the noise.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np

# CT classes (HU)
AIR, LUNG, FAT, SOFT, BONE = -1000.0, -800.0, -100.0, 40.0, 700.0
# T1-like MRI classes (a.u.); a small lesion is brighter (1000)
MRI_CLASSES = {"background": 0.0, "scalp": 500.0, "skull": 80.0, "csf": 150.0, "gm": 450.0, "wm": 750.0}


def _grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised coordinates in [-1, 1] along z, y, x (broadcastable, no full 3D copies)."""
    d, h, w = shape
    z = np.linspace(-1, 1, d, dtype=np.float32)[:, None, None]
    y = np.linspace(-1, 1, h, dtype=np.float32)[None, :, None]
    x = np.linspace(-1, 1, w, dtype=np.float32)[None, None, :]
    return z, y, x


def _ellipsoid(z, y, x, centre, radii) -> np.ndarray:
    (cz, cy, cx), (rz, ry, rx) = centre, radii
    return ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1.0


def _check_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"a phantom needs a 3D shape (D, H, W) with at least 2 voxels per axis, got {shape}")
    return tuple(int(n) for n in shape)  # type: ignore[return-value]


def ct_phantom(shape: tuple[int, int, int] = (64, 64, 64), seed: int = 0, noise_hu: float = 10.0) -> np.ndarray:
    """A chest-like CT in HU, float32 (z, y, x): air outside, a body ellipsoid of soft tissue with
    a fat layer, two lungs (the left one smaller, the heart beside it), a spine and a rib ring."""
    shape = _check_shape(shape)
    rng = np.random.default_rng(seed)
    j = lambda s=0.05: float(rng.uniform(-s, s))  # noqa: E731  small jitter
    z, y, x = _grid(shape)
    v = np.full(shape, AIR, np.float32)
    body_c, body_r = (j(), j(), j()), (0.92 + j(), 0.7 + j(), 0.88 + j())
    body = _ellipsoid(z, y, x, body_c, body_r)
    v[body] = FAT
    inner = _ellipsoid(z, y, x, body_c, (body_r[0] - 0.02, body_r[1] - 0.08, body_r[2] - 0.08))
    v[inner] = SOFT
    ribs = inner & ~_ellipsoid(z, y, x, body_c, (body_r[0] - 0.02, body_r[1] - 0.14, body_r[2] - 0.14))
    ribs &= z > -0.45 + body_c[0]  # the rib cage covers the chest, not the abdomen
    v[ribs] = BONE
    lz = 0.25 + j()  # lungs sit above the diaphragm (superior = +z)
    v[_ellipsoid(z, y, x, (lz, 0.02 + j(), 0.38 + j()), (0.55, 0.38, 0.27))] = LUNG  # right lung (+x)
    v[_ellipsoid(z, y, x, (lz, 0.02 + j(), -0.42 + j()), (0.5, 0.34, 0.2))] = LUNG  # left lung, smaller
    v[_ellipsoid(z, y, x, (0.1 + j(), 0.2 + j(), -0.12 + j()), (0.25, 0.2, 0.2))] = SOFT  # heart, anterior left
    spine = ((y - (-0.4 + body_c[1])) / 0.1) ** 2 + ((x - body_c[2]) / 0.1) ** 2 < 1.0  # posterior (-y)
    v[spine & body] = BONE
    if noise_hu:
        v += rng.normal(0.0, noise_hu, shape).astype(np.float32)
    return v


def mri_phantom(shape: tuple[int, int, int] = (64, 64, 64), seed: int = 0, noise: float = 10.0) -> np.ndarray:
    """A T1-like head, float32 (z, y, x), non-negative: scalp, skull, CSF, grey matter, white
    matter, two lateral ventricles (CSF) and a small bright lesion in the right hemisphere."""
    shape = _check_shape(shape)
    rng = np.random.default_rng(seed)
    j = lambda s=0.04: float(rng.uniform(-s, s))  # noqa: E731
    z, y, x = _grid(shape)
    c = (j(), j(), j())
    r = np.array([0.8 + j(), 0.9 + j(), 0.75 + j()])
    v = np.zeros(shape, np.float32)
    layers = [(1.0, "scalp"), (0.93, "skull"), (0.87, "csf"), (0.83, "gm"), (0.7, "wm")]
    for scale, name in layers:
        v[_ellipsoid(z, y, x, c, tuple(r * scale))] = MRI_CLASSES[name]
    for side in (-1, 1):  # lateral ventricles, slightly anterior
        v[_ellipsoid(z, y, x, (c[0] + 0.1, c[1] + 0.08, c[2] + side * 0.12), (0.18, 0.3, 0.07))] = MRI_CLASSES["csf"]
    v[_ellipsoid(z, y, x, (c[0] + 0.3 + j(), c[1] - 0.2 + j(), c[2] + 0.35 + j()), (0.07, 0.07, 0.07))] = 1000.0
    v *= np.where(z < c[0] - 0.45, 0.9, 1.0).astype(np.float32)  # gentle inferior-superior shading
    if noise:  # Rician-like: the magnitude of a complex Gaussian, so it stays >= 0
        n1 = rng.normal(0.0, noise, shape).astype(np.float32)
        n2 = rng.normal(0.0, noise, shape).astype(np.float32)
        v = np.sqrt((v + n1) ** 2 + n2**2)
    return v.astype(np.float32, copy=False)


def write_phantom(
    path: str | os.PathLike,
    kind: str = "ct",
    shape: tuple[int, int, int] = (64, 64, 64),
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    seed: int = 0,
) -> np.ndarray:
    """Write a phantom in physical units and return the array as written ((z, y, x), RAS).

    ``.nii``/``.nii.gz``: NIfTI-1 with the RAS affine of ``volume_affine`` (CT as int16 HU, MRI as
    float32).  ``.nrrd``/``.mha``/``.nhdr``/``.mhd``: through SimpleITK with the equivalent LPS
    direction (x and y reversed), so every format holds the same physical volume."""
    from model.data.volumes import _suffix, nifti_image, volume_affine

    if kind not in ("ct", "mri"):
        raise ValueError(f"kind must be 'ct' or 'mri', got {kind!r}")
    v = ct_phantom(shape, seed) if kind == "ct" else mri_phantom(shape, seed)
    data = np.clip(np.rint(v), -32768, 32767).astype(np.int16) if kind == "ct" else v
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    ext = _suffix(p)
    if ext in (".nii", ".nii.gz"):
        nifti_image(data, spacing, f"voxgen {kind} phantom seed {seed}").to_filename(str(p))
    elif ext in (".nrrd", ".nhdr", ".mha", ".mhd"):
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.ascontiguousarray(data))  # index (x, y, z) -> R, A, S
        img.SetSpacing(tuple(float(s) for s in spacing))
        img.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))  # ITK's physical space is LPS
        origin = volume_affine(data.shape, spacing)[:3, 3]
        img.SetOrigin((-float(origin[0]), -float(origin[1]), float(origin[2])))
        sitk.WriteImage(img, str(p))
    else:
        raise ValueError(f"{p.name}: write .nii.gz, .nii, .nrrd, .nhdr, .mha or .mhd")
    return data.astype(np.float32)


def write_dicom_series(
    folder: str | os.PathLike,
    array_hu: np.ndarray,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    *,
    series_uid: str | None = None,
    modality: str = "CT",
) -> Path:
    """Write a (z, y, x) RAS array as one DICOM series, one file per axial slice, the way a
    scanner does: rows run towards the patient's Left, columns towards Posterior (image
    orientation 1\\0\\0\\0\\1\\0), slices ordered inferior to superior with their positions,
    int16 pixels (values rounded and clipped), pixel spacing and slice thickness from ``spacing``
    (x, y, z) mm.  ``series_uid`` (default: a fresh UUID-derived UID) lets tests build several
    distinct series.  Returns the folder."""
    import SimpleITK as sitk

    from model.data.volumes import volume_affine

    a = np.asarray(array_hu)
    if a.ndim != 3:
        raise ValueError(f"expected a 3D (z, y, x) array, got shape {a.shape}")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    uid = series_uid or f"2.25.{uuid.uuid4().int}"
    study, frame = f"{uid}.1", f"{uid}.2"
    sop_class = "1.2.840.10008.5.1.4.1.1.4" if modality == "MR" else "1.2.840.10008.5.1.4.1.1.2"
    lps = np.clip(np.rint(a[:, ::-1, ::-1]), -32768, 32767).astype(np.int16)  # RAS -> LPS index order
    sx, sy, sz = (float(s) for s in spacing)
    ras0 = volume_affine(a.shape, spacing)[:3, 3]  # RAS position of voxel (0, 0, 0)
    # the first LPS voxel is the RAS voxel (W-1, H-1, 0); in LPS coordinates x and y change sign
    x0 = -(ras0[0] + (a.shape[2] - 1) * sx)
    y0 = -(ras0[1] + (a.shape[1] - 1) * sy)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(a.shape[0]):
        s = sitk.GetImageFromArray(lps[k])
        s.SetSpacing((sx, sy))
        tags = {
            "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
            "0008|0016": sop_class,
            "0008|0018": f"{uid}.3.{k + 1}",
            "0008|0060": modality,
            "0010|0010": "Phantom^Voxgen",
            "0010|0020": "PHANTOM",
            "0020|000d": study,
            "0020|000e": uid,
            "0020|0011": "1",
            "0020|0013": str(k + 1),
            "0020|0032": f"{x0:.6f}\\{y0:.6f}\\{ras0[2] + k * sz:.6f}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0052": frame,
            "0018|0050": f"{sz:.6f}",
            "0028|0030": f"{sy:.6f}\\{sx:.6f}",  # row spacing (y), column spacing (x)
        }
        for key, value in tags.items():
            s.SetMetaData(key, value)
        writer.SetFileName(str(out / f"slice{k:04d}.dcm"))
        writer.Execute(s)
    return out


__all__ = ["ct_phantom", "mri_phantom", "write_phantom", "write_dicom_series", "MRI_CLASSES"]
