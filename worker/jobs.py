"""Job functions: plain functions (params, model, output folder, progress callback) used by both
the embedded in-process queue and the Celery workers, plus ``execute``, which runs one job record
with its lease, progress, cancellation and atomic publication of the results."""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.labels import label_index
from worker import provenance
from worker.params import EncodeParams, GenerateParams, JobParams, ParamError, TrainParams, TrainRun, TraverseParams
from worker.params import parse as parse_params
from worker.settings import job_threads
from worker.store import TERMINAL, Storage

if TYPE_CHECKING:  # model.base imports torch; this module must not (the API imports reap)
    from model.base import Progress

log = logging.getLogger("voxgen.worker")

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
            from worker.settings import get_settings

            m = from_pretrained(path, device=dev, serving=True)  # G now, encoders on first use, never D
            m.set_precision(get_settings().precision)
            if hasattr(m, "memory_budget_mb"):
                m.memory_budget_mb = get_settings().memory_budget_mb
            _MODELS[key] = m
        return _MODELS[key]


# the file written per volume for each ``format`` of /generate and /traverse; "dicom": one zip of
# series (one folder per volume) for the whole job
EXTENSIONS = {"nifti": ".nii.gz", "npy": ".npy", "nrrd": ".nrrd", "mha": ".mha"}
DICOM_ZIP = "dicom.zip"


def _source(model: str, seed: int | None, index: int, count: int, what: str = "volume") -> Any:
    """What an output file says made it: the served model, and the seed (None: a latent was given)."""
    from model.data.export import VolumeSource

    return VolumeSource(model, seed, index, count, what)


def job_generate(params: GenerateParams, model: Any, out: Path, progress: Progress) -> dict[str, Any]:
    import numpy as np
    import torch

    from model.data.export import DicomZip
    from model.data.volumes import write_volume
    from worker.previews import write_preview

    if params.latent is not None:
        z, seed = torch.tensor(params.latent, dtype=torch.float32), None
    else:
        z, seed = model.sample_latents(params.n, int(params.seed)), params.seed  # type: ignore[arg-type]
    vols = model.generate(z, label_index(model.class_names, params.label), progress=progress)
    fmt, n = params.format, vols.shape[0]
    extra: dict[str, Any] = {"seed": params.seed}
    if fmt == "dicom":
        with DicomZip(out / DICOM_ZIP, model.config, f"SYNTHETIC voxgen {params.model} volumes") as dz:
            for i in range(n):
                v = vols[i, 0].numpy()
                dz.add(f"volume_{i:03d}", v, _source(params.model, seed, i, n))
                write_preview(out / f"volume_{i:03d}.png", v, model.config)
        extra["dicom"] = dz.series  # per volume its folder in the zip and its series UID
    else:
        ext = EXTENSIONS[fmt]
        for i in range(n):
            v = vols[i, 0].numpy()
            write_volume(out / f"volume_{i:03d}{ext}", v, model.config, source=_source(params.model, seed, i, n))
            write_preview(out / f"volume_{i:03d}.png", v, model.config)
    np.save(out / "latent.npy", z.numpy())  # the latents stay in storage: only small metadata in Redis
    return extra


def job_encode(params: EncodeParams, model: Any, out: Path, progress: Progress) -> dict[str, Any]:
    import numpy as np
    import torch

    from model.data.volumes import VolumeError, load_for_model, write_in_input_space, write_volume
    from worker.previews import write_preview

    name = params.filename or "upload"
    info: dict[str, Any] = {}
    try:  # an upload: one file only, messages without server paths, the API's voxel bound
        x = load_for_model(
            params.upload,
            model.config,
            info=info,
            untrusted=True,
            max_voxels=params.max_voxels,
            series_uid=params.series_uid,
        )
    except VolumeError as e:
        raise JobError(str(e).replace(Path(params.upload).name, name)) from e
    except (OSError, RuntimeError, MemoryError) as e:  # a reader's own error may name paths: not shown
        raise JobError(f"{name}: not a readable 3D volume ({type(e).__name__})") from e
    # the upload on the model's cube (the family's encode resamples it to the network's grid, as its
    # trainer did the training data), for comparison; the cube's own voxel size for the aspect
    write_preview(out / "input.png", x, model.config.cube())
    label = label_index(model.class_names, params.label)
    kw: dict[str, Any] = {} if params.steps is None else {"steps": params.steps}  # None: the model's default
    if model.class_names:  # (HA-GAN) a conditional model's fit generates the request's class (the API requires one)
        kw["label"] = label
    z = model.encode(torch.from_numpy(x)[None, None], progress=progress, **kw)
    np.save(out / "latent.npy", z.numpy())
    if params.reconstruct:
        v = model.generate(z, label, progress=progress)
        if params.space == "input":  # the upload's own grid and affine: it overlays the upload
            write_in_input_space(out / "reconstruction.nii.gz", v[0, 0].numpy(), model.config, info)
        else:
            src = _source(params.model, None, 0, 1, "reconstruction")
            write_volume(out / "reconstruction.nii.gz", v[0, 0].numpy(), model.config, source=src)
        write_preview(out / "reconstruction.png", v[0, 0].numpy(), model.config)  # beside input.png: network grid
        return {"latent": z[0].tolist(), "space": params.space}
    return {"latent": z[0].tolist()}


def job_traverse(params: TraverseParams, model: Any, out: Path, progress: Progress) -> dict[str, Any]:
    import numpy as np
    import torch

    from model.data.export import DicomZip
    from model.data.volumes import write_volume
    from model.latent.directions import Direction, measure_model_volume, traverse
    from worker.previews import write_preview

    d = params.direction
    direction = Direction(d.name, d.attribute or "", torch.tensor(d.vector), d.intercept, 0.0, None, 0)
    if params.latent is not None:
        z0, seed = torch.tensor([params.latent], dtype=torch.float32), None
    else:
        z0, seed = model.sample_latents(1, int(params.seed)), params.seed  # type: ignore[arg-type]
    label = label_index(model.class_names, params.label)
    attribute = direction.attribute

    def measure(z: torch.Tensor) -> float:  # the target's refinement: generate and measure, as reported below
        progress(0, params.n_steps, "refine")
        return measure_model_volume(model.generate(z, label)[0, 0].numpy(), model.config, attribute)

    rows = traverse(
        model,
        z0,
        direction,
        steps=params.steps,
        target=params.target,
        n_steps=params.n_steps,
        measure=measure if attribute else None,
        refine=params.refine,
    )
    fmt = params.format
    dz = None
    if fmt == "dicom":
        dz = DicomZip(out / DICOM_ZIP, model.config, f"SYNTHETIC voxgen {params.model} traverse")
    steps = []
    try:
        for i, row in enumerate(rows):
            v = model.generate(row["latent"], label)[0, 0].numpy()
            src = _source(params.model, seed, i, len(rows), "step")
            if dz is not None:  # one series per step, in the folder step_XX of dicom.zip
                info = dz.add(f"step_{i:02d}", v, src)
                entry = {"alpha": row["alpha"], "latent": row["latent"][0].tolist(), "file": DICOM_ZIP}
                entry |= {"folder": info["folder"], "series_uid": info["series_uid"]}
            else:
                name = f"step_{i:02d}{EXTENSIONS[fmt]}"
                write_volume(out / name, v, model.config, source=src)
                entry = {"alpha": row["alpha"], "latent": row["latent"][0].tolist(), "file": name}
            write_preview(out / f"step_{i:02d}.png", v, model.config)
            if direction.attribute:
                entry["predicted"] = row["predicted"]
                entry["measured"] = measure_model_volume(v, model.config, direction.attribute)
            steps.append(entry)
            progress(i + 1, len(rows), "generate")
    except BaseException:
        if dz is not None:
            dz.abort()  # nothing half-written stays in the job's folder
        raise
    if dz is not None:
        dz.close()
    np.save(out / "latents.npy", np.stack([np.asarray(s["latent"], np.float32) for s in steps]))
    result = {"direction": direction.name, "attribute": direction.attribute or None, "steps": steps}
    if "refine" in rows[-1]:
        result["refine"] = rows[-1]["refine"]
    return result


def job_train(params: TrainParams, model: Any, out: Path, progress: Progress) -> dict[str, Any]:
    """Train a model (any family) on a prepared dataset, then register it so GET /models lists it.  A
    re-run of the same job (after its worker died) resumes from the run's last checkpoint.  Where
    it runs (``params.run``: models directory, storage root, job id, device) the worker sets."""
    import shutil

    from model.checkpoint import register_model
    from model.training import train

    place = params.run
    if place is None:
        raise JobError("a training job needs its run place (set by worker.jobs.execute)")
    run = Path(place.storage_root) / "runs" / place.job_id
    opts = params.model_dump(exclude={"name", "model"})
    opts |= {"output": str(run), "resume": (run / "latest.json").is_file(), "device": place.device}
    opts["checkpoint_every"] = max(1, min(100, params.iterations // 10))
    opts["preview_every"] = opts["checkpoint_every"]
    try:
        processes = int(opts.pop("processes", None) or 1)  # > 1: ranks of torch.distributed.run
        if processes > 1:
            from model.distributed import launch

            model_dir = launch(opts, processes, progress)
        else:
            model_dir = train(opts, progress)
    except (ValueError, FileNotFoundError) as e:
        raise JobError(str(e)) from e
    register_model(model_dir, Path(place.models_dir), params.name)
    shutil.copy2(run / "metrics.jsonl", out / "metrics.jsonl")
    previews = sorted((run / "previews").glob("*.png"))
    if previews:
        shutil.copy2(previews[-1], out / "preview.png")
    return {"model": params.name}


# each takes its kind's parameters (worker/params.py), the loaded model (None for train), the
# scratch folder and the progress callback, and returns the small inline values of its result
JOBS: dict[str, Callable[[Any, Any, Path, Progress], dict[str, Any]]] = {
    "generate": job_generate,
    "encode": job_encode,
    "traverse": job_traverse,
    "train": job_train,
}


def worker_name() -> str:
    return f"{platform.node()}:{os.getpid()}"


def _gpu_peak(dev: str, reset: bool = False) -> dict[str, int]:
    """On a CUDA device: the peak memory torch allocated there since the last reset, for the job
    record (``gpu_peak_bytes``; GET /metrics reports the largest per worker).  Elsewhere nothing."""
    if not dev.startswith("cuda"):
        return {}
    import torch

    if reset:
        torch.cuda.reset_peak_memory_stats(dev)
        return {}
    return {"gpu_peak_bytes": int(torch.cuda.max_memory_allocated(dev))}


def execute(
    job_id: str,
    attempt: int,
    records: Any,
    storage: Storage,
    models_dir: str | os.PathLike,
    device: str = "auto",
    lease_seconds: float = 30.0,
    threads: int = 0,
) -> None:
    """Run one delivery of a job: claim the record, hold a lease with a heartbeat, report progress
    into the record, publish the results atomically.  The lease protocol is described in
    worker/store.py: a delivery runs only if it claims a ``queued`` record of the same attempt.

    The job's CPU arithmetic runs on ``job_threads(threads)`` torch threads, set here in the thread
    that runs the job (torch's intra-op thread count is per calling thread): the float summation
    order of the CPU kernels follows the thread count on some CPUs (Intel AVX-512 / AMX), so the
    embedded queue and every Celery worker pin it to give the same volume for the same seed."""
    import torch

    from model.registry import resolve_device

    n_threads = job_threads(threads)
    torch.set_num_threads(n_threads)
    dev = str(resolve_device(device))
    _gpu_peak(dev, reset=True)
    now = time.time()
    rec = records.update_if(
        job_id,
        lambda r: r["state"] == "queued" and r.get("attempt", 1) == attempt,
        state="running",
        lease_until=now + lease_seconds,
        worker=worker_name(),
        device=dev,
        threads=n_threads,
        started=now,
        progress={"done": 0, "total": 1, "stage": "loading model"},
    )
    if rec is None:
        return  # unknown, expired, cancelled, finished, running elsewhere, or an older attempt
    mine = lambda r: r.get("attempt") == attempt and r["state"] == "running"  # noqa: E731
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(max(0.2, lease_seconds / 3)):
            try:
                if records.update_if(job_id, mine, lease_until=time.time() + lease_seconds) is None:
                    return  # cancelled or superseded: the job thread stops at its next progress report
            except Exception:  # a transient Redis error: try again at the next beat
                pass

    beat = threading.Thread(target=heartbeat, name=f"lease-{job_id[:8]}", daemon=True)
    beat.start()
    scratch = storage.scratch(job_id, attempt)  # (older attempts' folders here are removed)

    def progress(done: int, total: int, stage: str) -> None:
        cur = records.update_if(job_id, mine, progress={"done": int(done), "total": int(total), "stage": stage})
        if cur is None:
            cur = records.get(job_id)
            raise Cancelled() if cur is None or cur["state"] == "cancelled" else Superseded()

    def finish(**fields: Any) -> dict[str, Any] | None:
        return records.update_if(job_id, mine, lease_until=None, finished=time.time(), **_gpu_peak(dev), **fields)

    try:
        fn = JOBS[rec["kind"]]
        try:  # the parameters the API validated, back into their model (worker/params.py)
            params: JobParams = parse_params(rec["kind"], rec["params"])
        except ParamError as e:
            raise JobError(str(e)) from e
        if isinstance(params, EncodeParams):  # its input: from shared storage onto this machine
            params = params.model_copy(update={"upload": str(storage.fetch_upload(job_id, params.upload))})
        if isinstance(params, TrainParams):
            model = None
            params.run = TrainRun(
                models_dir=str(models_dir), storage_root=str(storage.root), job_id=job_id, device=device
            )
        else:
            model = get_model(models_dir, str(params.model), device)
        extra = fn(params, model, scratch, progress)
        cur = records.get(job_id)
        if cur is not None and mine(cur):  # not cancelled or superseded meanwhile
            doc = provenance.build(
                job_id=job_id,
                rec=rec,
                params=params.model_dump(),
                model=model,
                models_dir=models_dir,
                scratch=scratch,
                device=dev,
                threads=n_threads,
                worker=worker_name(),
                started=now,
                finished=time.time(),
            )
            provenance.write(scratch, doc)  # beside the results, listed with them
            files = storage.publish(job_id, scratch)
            for f in files:
                f["url"] = f"/jobs/{job_id}/files/{f['name']}"
            result = {"files": files, "provenance": f"/jobs/{job_id}/files/{provenance.NAME}"}
            result |= {k: v for k, v in extra.items() if v is not None}
            done = finish(state="succeeded", result=result, progress={"done": 1, "total": 1, "stage": "done"})
            if done is not None:
                _keep_record_copy(storage, job_id, done)
    except Superseded:
        return  # the newer attempt owns the job (and its upload)
    except Cancelled:
        pass
    except JobError as e:
        finish(state="failed", error=str(e))
    except Exception as e:
        detail = "".join(traceback.format_exception_only(type(e), e)).strip()
        finish(state="failed", error=f"internal error: {detail}")
    finally:
        stop.set()
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    cur = records.get(job_id)
    if cur is None or (cur["state"] in TERMINAL and cur.get("attempt") == attempt):
        storage.delete_upload(job_id)  # an encode job's input is no longer needed (or its job is gone)


def _keep_record_copy(storage: Any, job_id: str, rec: dict[str, Any]) -> None:
    """The succeeded record beside the job's files (``storage.put_record``): a record store that
    loses it re-indexes it from there.  A failure to write it does not fail the job."""
    try:
        storage.put_record(job_id, rec)
    except Exception as e:  # the store briefly unreachable: the record itself is written
        log.warning("job %s: the copy of its record beside its files was not written: %s", job_id, e)


def reap(
    records: Any, resubmit: Callable[[str, int, str], None], now: float | None = None, storage: Any = None
) -> list[str]:
    """Re-queue running jobs whose lease lapsed (their worker died, even by ``kill -9``).

    Called periodically by the API's reaper thread (Celery mode) and by a thread in every worker
    process.  The state change is a compare-and-set on (running, same attempt, lease lapsed), so of
    several concurrent reapers exactly one re-queues a job, with ``attempt + 1``; the new attempt's
    message is then sent with ``resubmit(job_id, attempt, kind)``, and the dead attempt's scratch
    folder is removed from ``storage`` where this process reaches it (the shared directory; with S3
    only this machine's spool: a worker on the dead one's machine sweeps it when it starts, and
    every minute).  Returns the re-queued ids."""
    now = time.time() if now is None else now
    out = []
    # the active index (queued and running jobs), not every record: a reaper runs every lease/3
    # seconds in every worker and API process, and the records of a day's finished jobs are many
    for job_id, state in records.active().items():
        if state != "running":
            continue
        rec = records.get(job_id)
        if not rec or rec["state"] != "running" or not rec.get("lease_until") or rec["lease_until"] >= now:
            continue
        old = int(rec.get("attempt", 1))
        new = records.update_if(
            job_id,
            lambda r, old=old: (
                r["state"] == "running" and r.get("attempt", 1) == old and (r.get("lease_until") or now) < now
            ),
            state="queued",
            attempt=old + 1,
            lease_until=None,
            progress={"done": 0, "total": 1, "stage": f"re-queued: lease of worker {rec.get('worker')} lapsed"},
        )
        if new is not None:
            resubmit(job_id, old + 1, new["kind"])
            out.append(job_id)
            if storage is not None:
                try:
                    storage.drop_scratch(job_id, before_attempt=old + 1)
                except OSError as e:  # the scratch is left to the next sweep
                    log.warning("job %s: the lapsed attempt's scratch folder was not removed: %s", job_id, e)
    return out
