"""``provenance.json``: what made a job's results, written beside them before they are published.

It records the model (served name, family, modality, the sha256 of its weights file and of its
``config.json``), the voxgen version, the seed or latent, every request parameter (server-side
values such as an upload's path are left out; an upload is named by its file name and sha256),
the device, the precision of the weights, the CPU threads, the worker, the software versions, the
times, and the sha256 of every other result file."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import threading
from pathlib import Path
from typing import Any

NAME = "provenance.json"
_CHUNK = 1 << 20
_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: weights are hashed once
_HASHES_LOCK = threading.Lock()
# request fields that are the server's own bookkeeping, not what the user asked for
_SERVER_ONLY = ("upload",)


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(_CHUNK):
            h.update(b)
    return h.hexdigest()


def _cached_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _HASHES_LOCK:
        if key in _HASHES:
            return _HASHES[key]
    digest = sha256_file(path)
    with _HASHES_LOCK:
        _HASHES[key] = digest
    return digest


def model_record(model_dir: str | os.PathLike, name: str) -> dict[str, Any]:
    """A served model as provenance sees it: name, family, modality, the weights file's and the
    config's sha256 and size."""
    d = Path(model_dir)
    out: dict[str, Any] = {"name": name}
    cfg_path = d / "config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
            out |= {k: cfg.get(k) for k in ("family", "modality", "resolution", "latent_dim") if k in cfg}
        except (OSError, ValueError):
            pass
        out["config_sha256"] = _cached_sha256(cfg_path)
    weights = d / "model.safetensors"
    if weights.is_file():
        out["weights"] = {"file": weights.name, "bytes": weights.stat().st_size, "sha256": _cached_sha256(weights)}
    return out


def _precision(model: Any) -> str | None:
    """The generation arithmetic: the model's ``precision`` (fp32 | bf16), else its weights' dtype."""
    if isinstance(getattr(model, "precision", None), str):
        return model.precision
    net = getattr(model, "net", None)
    if net is None:
        return None
    try:
        return str(next(net.parameters()).dtype).removeprefix("torch.")
    except (StopIteration, AttributeError, TypeError):
        return None


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="milliseconds")


def _software() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for mod in ("torch", "numpy", "SimpleITK", "nibabel", "pydicom"):
        try:
            m = __import__(mod)
            out[mod] = str(getattr(m, "__version__", None) or getattr(m, "Version", lambda: "")())
        except Exception:  # not installed, or a version it cannot report: left out
            continue
    return out


def build(
    *,
    job_id: str,
    rec: dict[str, Any],
    params: dict[str, Any],
    model: Any,
    models_dir: str | os.PathLike,
    scratch: Path,
    device: str,
    threads: int,
    worker: str,
    started: float,
    finished: float,
) -> dict[str, Any]:
    """The provenance of one finished job (``params`` as the job ran with them: an encode job's
    ``upload`` is a local path, hashed and left out)."""
    from model.data.export import voxgen_version

    kind = rec["kind"]
    name = params.get("name") if kind == "train" else params.get("model")
    request = {k: v for k, v in (rec.get("params") or {}).items() if not k.startswith("_") and k not in _SERVER_ONLY}
    doc: dict[str, Any] = {
        "synthetic": kind != "train",
        "generator": "voxgen",
        "voxgen_version": voxgen_version(),
        "job": {"id": job_id, "kind": kind, "attempt": int(rec.get("attempt", 1))},
        "model": model_record(Path(models_dir) / str(name), str(name)) if name else None,
        "seed": params.get("seed"),
        "latent": params.get("latent"),
        "request": request,
    }
    if doc["model"] is not None and model is not None:
        doc["model"].setdefault("family", getattr(model, "family", None))
    if (scratch / "latent.npy").is_file() or (scratch / "latents.npy").is_file():
        doc["latent_file"] = "latent.npy" if (scratch / "latent.npy").is_file() else "latents.npy"
    upload = params.get("upload")
    if upload and Path(upload).exists():
        up = Path(upload)
        entry: dict[str, Any] = {"filename": params.get("filename")}
        if up.is_file():
            entry |= {"bytes": up.stat().st_size, "sha256": sha256_file(up)}
        doc["input"] = entry
    doc |= {
        "device": device,
        "precision": _precision(model) or ("fp32" if kind != "train" else None),
        "threads": threads,
        "worker": worker,
        "software": _software(),
        "time": {
            "created": _iso(rec.get("created")),
            "started": _iso(started),
            "finished": _iso(finished),
            "seconds": round(finished - started, 3),
        },
        "files": [
            {"name": f.name, "bytes": f.stat().st_size, "sha256": sha256_file(f)}
            for f in sorted(scratch.iterdir())
            if f.is_file() and f.name != NAME and not f.name.startswith(".")
        ],
    }
    return doc


def write(scratch: Path, doc: dict[str, Any]) -> Path:
    """``provenance.json`` into the job's scratch folder (written whole under a temporary name,
    then renamed, as every result file)."""
    p = scratch / NAME
    tmp = scratch / f".{NAME}.tmp"
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, p)
    return p


__all__ = ["NAME", "build", "write", "sha256_file", "model_record"]
