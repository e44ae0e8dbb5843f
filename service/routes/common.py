"""Helpers shared by the routes: the served models, job submission, label checks."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request

from model.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ModelDirError,
    direction_names,
    read_config_cached,
)
from model.labels import LabelError, label_index
from service.errors import invalid
from service.schemas import JobAccepted
from worker.params import JobParams
from worker.store import new_job_id, new_record

JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def list_models(models_dir: Path) -> dict[str, dict[str, Any]]:
    """Each sub-directory of the models directory with a config.json and weights is a model,
    served under its directory name.  A missing models directory serves none.  Configs and
    direction names are read by model/checkpoint.py (torch-free, cached until a file changes)."""
    out: dict[str, dict[str, Any]] = {}
    if not models_dir.is_dir():
        return out
    for d in sorted(models_dir.iterdir()):
        if d.is_dir() and not d.name.startswith(".") and (d / CONFIG_NAME).is_file() and (d / WEIGHTS_NAME).is_file():
            try:
                c = read_config_cached(d)
            except (ModelDirError, OSError, UnicodeDecodeError):
                continue
            card = (d / "README.md").is_file()
            out[d.name] = {"name": d.name, "config": c, "directions": direction_names(d), "card": card}
    return out


def describe(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    c = entry["config"]
    res = c.get("resolution")
    return {
        "name": name,
        "family": c.get("family"),
        "resolution": res,
        "output_shape": [res] * 3 if res else c.get("shape"),
        "modality": c.get("modality"),
        "spacing": c.get("spacing"),
        "latent_dim": c.get("latent_dim"),
        "classes": c.get("class_names") or [],
        "intensity": c.get("intensity"),
        "directions": entry["directions"],
        "description": c.get("description", ""),
        "card_url": f"/models/{name}/card" if entry.get("card") else None,
    }


def models(request: Request) -> dict[str, dict[str, Any]]:
    return list_models(request.app.state.settings.models_dir)


def model_or_404(request: Request, name: str) -> dict[str, Any]:
    m = models(request)
    if name not in m:
        raise HTTPException(404, f"unknown model {name!r}; served models: {', '.join(m) or '(none)'}")
    return m[name]


def check_label(cfg: dict[str, Any], label: str | int | None) -> str | None:
    """The label as the job gets it: a class name, or None (model/labels.py ``label_index``, the one
    resolver).  422 at ``label`` when it does not fit the model."""
    names = list(cfg.get("class_names") or [])
    try:
        i = label_index(names, label)
    except LabelError as e:
        raise invalid(str(e), "label") from None
    return None if i is None else names[i]


def submit(request: Request, params: JobParams, job_id: str | None = None) -> JobAccepted:
    """Queue a job of ``params``' kind: its record carries the validated parameters as JSON, which
    the worker parses back into the same model (worker/params.py)."""
    jobs = request.app.state.jobs
    job_id = job_id or new_job_id()
    jobs.records.put(new_record(job_id, params.kind, params.dump()))
    jobs.submit(job_id, 1, params.kind)
    return JobAccepted(job_id=job_id, status_url=f"/jobs/{job_id}")


def find_record(request: Request, job_id: str) -> dict[str, Any] | None:
    """A job's record; or, when the record store lost it (Redis restarted without persistence,
    the embedded queue's process restarted), the copy a succeeded job keeps beside its files,
    re-indexed into the store with the TTL it has left (worker/store.py: put_record)."""
    if not JOB_ID.fullmatch(job_id):
        return None
    records = request.app.state.jobs.records
    rec = records.get(job_id)
    if rec is not None:
        return rec
    copy = request.app.state.storage.get_record(job_id)
    ttl = request.app.state.settings.result_ttl_hours * 3600
    if copy is None or time.time() - float(copy.get("created") or 0) >= ttl:
        return None
    records.restore(copy, ttl)
    return records.get(job_id) or copy


def job_record(request: Request, job_id: str) -> dict[str, Any]:
    rec = find_record(request, job_id)
    if rec is None:
        raise HTTPException(404, f"no job {job_id!r} (unknown, or expired after VOXGEN_RESULT_TTL_HOURS)")
    return rec
