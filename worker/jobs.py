"""Job functions: plain functions (params, model, output folder, progress callback) used by both
the embedded in-process queue and the Celery workers, plus ``execute``, which runs one job record
with its lease, progress, cancellation and atomic publication of the results."""

from __future__ import annotations

import os
import platform
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.store import TERMINAL, Storage

Progress = Callable[[int, int, str], None]

_MODELS: dict[tuple[str, str], Any] = {}
_MODELS_LOCK = threading.Lock()


class JobError(Exception):
    """A job failed for a reason the user should read (bad input found while running)."""


class Cancelled(Exception):
    pass


class Superseded(Exception):
    """This delivery is an older attempt of a job that was re-queued elsewhere."""


def get_model(models_dir: str | os.PathLike, name: str, device: str = "auto") -> Any:
    """Models are loaded once per process and kept on their device."""
    from model.registry import from_pretrained, resolve_device

    path = Path(models_dir) / name
    dev = resolve_device(device)
    key = (str(path.resolve()), str(dev))
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = from_pretrained(path, device=dev)
        return _MODELS[key]


def _label_index(model: Any, label: Any) -> int | None:
    if label is None:
        return None
    names = model.class_names
    if isinstance(label, str) and label in names:
        return names.index(label)
    return int(label)


def job_generate(params: dict[str, Any], model: Any, out: Path, progress: Progress) -> dict[str, Any]:
    import numpy as np
    import torch

    from model.data.volumes import write_volume

    if params.get("latent") is not None:
        z = torch.tensor(params["latent"], dtype=torch.float32).reshape(-1, model.latent_dim)
    else:
        z = model.sample_latents(int(params.get("n", 1)), int(params["seed"]))
    vols = model.generate(z, _label_index(model, params.get("label")), progress=progress)
    ext = ".npy" if params.get("format") == "npy" else ".nii.gz"
    for i in range(vols.shape[0]):
        write_volume(out / f"volume_{i:03d}{ext}", vols[i, 0].numpy(), model.config)
    np.save(out / "latent.npy", z.numpy())  # the latents stay in storage: only small metadata in Redis
    return {"seed": params.get("seed")}


def job_encode(params: dict[str, Any], model: Any, out: Path, progress: Progress) -> dict[str, Any]:
    import numpy as np
    import torch

    from model.data.volumes import VolumeError, load_for_model, write_volume

    try:
        x = load_for_model(params["upload"], model.config)
    except VolumeError as e:
        raise JobError(str(e)) from e
    z = model.encode(torch.from_numpy(x)[None, None], progress=progress)
    np.save(out / "latent.npy", z.numpy())
    if params.get("reconstruct"):
        v = model.generate(z, _label_index(model, params.get("label")), progress=progress)
        write_volume(out / "reconstruction.nii.gz", v[0, 0].numpy(), model.config)
    return {"latent": z[0].tolist()}


def job_traverse(params: dict[str, Any], model: Any, out: Path, progress: Progress) -> dict[str, Any]:
    import numpy as np
    import torch

    from model.data.volumes import write_volume
    from model.latent.directions import Direction, measure_attribute, traverse

    d = params["direction"]
    direction = Direction(
        d.get("name") or "vector",
        d.get("attribute") or "",
        torch.tensor(d["vector"]),
        float(d.get("intercept") or 0.0),
        0.0,
        None,
        0,
    )
    if params.get("latent") is not None:
        z0 = torch.tensor(params["latent"], dtype=torch.float32).reshape(1, -1)
    else:
        z0 = model.sample_latents(1, int(params["seed"]))
    rows = traverse(
        model,
        z0,
        direction,
        steps=params.get("steps"),
        target=params.get("target"),
        n_steps=int(params.get("n_steps", 5)),
    )
    label = _label_index(model, params.get("label"))
    ext = ".npy" if params.get("format") == "npy" else ".nii.gz"
    steps = []
    for i, row in enumerate(rows):
        v = model.generate(row["latent"], label)[0, 0].numpy()
        write_volume(out / f"step_{i:02d}{ext}", v, model.config)
        entry = {"alpha": row["alpha"], "latent": row["latent"][0].tolist(), "file": f"step_{i:02d}{ext}"}
        if direction.attribute:
            entry["predicted"] = row["predicted"]
            entry["measured"] = measure_attribute(
                model.config.intensity.to_physical(v), model.config.spacing, direction.attribute
            )
        steps.append(entry)
        progress(i + 1, len(rows), "generate")
    np.save(out / "latents.npy", np.stack([np.asarray(s["latent"], np.float32) for s in steps]))
    return {"direction": direction.name, "attribute": direction.attribute or None, "steps": steps}


def job_train(params: dict[str, Any], model: Any, out: Path, progress: Progress) -> dict[str, Any]:
    """Train an HA-GAN on a prepared dataset, then register it so GET /models lists it.  A re-run of
    the same job (after its worker died) resumes from the run's last checkpoint."""
    import shutil

    from model.hagan.train import register_model, train

    run = Path(params["_storage_root"]) / "runs" / params["_job_id"]
    opts = {k: params.get(k) for k in ("data", "resolution", "iterations", "batch", "width", "latent_dim", "seed")}
    opts |= {"output": str(run), "resume": (run / "latest.json").is_file(), "device": params.get("_device")}
    opts["checkpoint_every"] = max(1, min(100, int(params.get("iterations") or 1000) // 10))
    opts["preview_every"] = opts["checkpoint_every"]
    try:
        model_dir = train(opts, progress)
    except (ValueError, FileNotFoundError) as e:
        raise JobError(str(e)) from e
    register_model(model_dir, Path(params["_models_dir"]), params["name"])
    shutil.copy2(run / "metrics.jsonl", out / "metrics.jsonl")
    previews = sorted((run / "previews").glob("*.png"))
    if previews:
        shutil.copy2(previews[-1], out / "preview.png")
    return {"model": params["name"]}


JOBS: dict[str, Callable[[dict[str, Any], Any, Path, Progress], dict[str, Any]]] = {
    "generate": job_generate,
    "encode": job_encode,
    "traverse": job_traverse,
    "train": job_train,
}


def worker_name() -> str:
    return f"{platform.node()}:{os.getpid()}"


def execute(
    job_id: str,
    attempt: int,
    records: Any,
    storage: Storage,
    models_dir: str | os.PathLike,
    device: str = "auto",
    lease_seconds: float = 30.0,
) -> None:
    """Run one job: lease + heartbeat, progress into the record, results published atomically."""
    rec = records.get(job_id)
    if rec is None or rec["state"] in TERMINAL or rec.get("attempt", 1) != attempt:
        return  # unknown, finished, cancelled, or a stale delivery of an older attempt
    from model.registry import resolve_device

    dev = str(resolve_device(device))
    records.update(
        job_id,
        state="running",
        lease_until=time.time() + lease_seconds,
        worker=worker_name(),
        device=dev,
        started=time.time(),
        progress={"done": 0, "total": 1, "stage": "loading model"},
    )
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(max(0.5, lease_seconds / 3)):
            try:
                cur = records.get(job_id)
                if cur is None or cur.get("attempt") != attempt or cur["state"] != "running":
                    return
                records.update(job_id, lease_until=time.time() + lease_seconds)
            except Exception:  # a transient Redis error: try again at the next beat
                pass

    beat = threading.Thread(target=heartbeat, name=f"lease-{job_id[:8]}", daemon=True)
    beat.start()
    scratch = storage.scratch(job_id)

    def progress(done: int, total: int, stage: str) -> None:
        cur = records.get(job_id)
        if cur is None or cur["state"] == "cancelled":
            raise Cancelled()
        if cur.get("attempt") != attempt:
            raise Superseded()
        records.update(job_id, progress={"done": int(done), "total": int(total), "stage": stage})

    try:
        fn = JOBS[rec["kind"]]
        params = dict(rec["params"])
        if rec["kind"] == "train":
            model = None
            params |= {
                "_models_dir": str(models_dir),
                "_storage_root": str(storage.root),
                "_job_id": job_id,
                "_device": device,
            }
        else:
            model = get_model(models_dir, params["model"], device)
        extra = fn(params, model, scratch, progress)
        cur = records.get(job_id)
        if cur is None or cur["state"] == "cancelled" or cur.get("attempt") != attempt:
            return
        files = storage.publish(job_id, scratch)
        for f in files:
            f["url"] = f"/jobs/{job_id}/files/{f['name']}"
        result = {"files": files} | {k: v for k, v in extra.items() if v is not None}
        records.update(
            job_id,
            state="succeeded",
            result=result,
            finished=time.time(),
            lease_until=None,
            progress={"done": 1, "total": 1, "stage": "done"},
        )
    except (Cancelled, Superseded):
        pass
    except JobError as e:
        records.update(job_id, state="failed", error=str(e), lease_until=None, finished=time.time())
    except Exception as e:
        detail = "".join(traceback.format_exception_only(type(e), e)).strip()
        records.update(job_id, state="failed", error=f"internal error: {detail}", lease_until=None)
    finally:
        stop.set()
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
