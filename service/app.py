"""The FastAPI application.  Thin routes; pydantic schemas are the contract; the API process does
not import torch unless it runs the embedded queue (whose worker thread loads the models)."""

from __future__ import annotations

import json
import secrets
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field, field_validator

from service.settings import Settings, get_settings
from worker.store import TERMINAL, MemoryRecords, Storage, new_job_id, new_record

# ---------------------------------------------------------------------------------------- schemas


class GenerateRequest(BaseModel):
    model: str
    n: int = Field(1, ge=1, description="number of volumes")
    seed: int | None = Field(None, ge=0, lt=2**63)
    latent: list[float] | list[list[float]] | None = None
    label: str | int | None = None
    format: Literal["nifti", "npy"] = "nifti"

    @field_validator("latent")
    @classmethod
    def finite(cls, v: Any) -> Any:
        flat = [x for row in v for x in row] if v and isinstance(v[0], list) else (v or [])
        if any(x != x or x in (float("inf"), float("-inf")) for x in flat):
            raise ValueError("latent contains NaN or infinite values")
        return v


class TraverseRequest(BaseModel):
    model: str
    seed: int | None = Field(None, ge=0, lt=2**63)
    latent: list[float] | None = None
    job_id: str | None = Field(None, description="an encode job whose latent to start from")
    direction: str | list[float]
    steps: list[float] | None = Field(None, min_length=1, max_length=32, description="alphas along the unit direction")
    target: float | None = Field(None, description="attribute value to reach (named directions)")
    n_steps: int = Field(5, ge=1, le=32)
    label: str | int | None = None
    format: Literal["nifti", "npy"] = "nifti"

    @field_validator("latent", "steps", "direction")
    @classmethod
    def finite(cls, v: Any) -> Any:
        if isinstance(v, list) and any(x != x or x in (float("inf"), float("-inf")) for x in v):
            raise ValueError("contains NaN or infinite values")
        return v


class JobAccepted(BaseModel):
    job_id: str
    status_url: str


class TrainRequest(BaseModel):
    family: Literal["hagan"] = "hagan"
    data: str = Field(description="a dataset folder made by `voxgen prepare`, as the worker sees it")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="served model name")
    resolution: Literal[128, 256, 512] | None = None
    iterations: int = Field(1000, ge=1, le=10_000_000)
    batch: int = Field(2, ge=1, le=64)
    width: float = Field(1.0, gt=0, le=4)
    latent_dim: int = Field(1024, ge=1, le=8192)
    seed: int = Field(0, ge=0, lt=2**63)


# ---------------------------------------------------------------------------------------- models


def list_models(models_dir: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if not models_dir.is_dir():
        return out
    for d in sorted(models_dir.iterdir()):
        cfg = d / "config.json"
        if d.is_dir() and cfg.is_file() and (d / "model.safetensors").is_file():
            try:
                c = json.loads(cfg.read_text())
            except json.JSONDecodeError:
                continue
            out[d.name] = {"name": d.name, "config": c, "directions": _direction_names(d)}
    return out


def _direction_names(d: Path) -> list[str]:
    f = d / "directions.safetensors"
    if not f.is_file():
        return []
    try:
        from safetensors import safe_open

        with safe_open(str(f), framework="numpy") as sf:
            return sorted(sf.keys())
    except Exception:
        return []


def _read_direction(model_dir: Path, name: str) -> dict[str, Any] | None:
    f = model_dir / "directions.safetensors"
    if not f.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(f), framework="numpy") as sf:
            if name not in sf.keys():
                return None
            meta = json.loads((sf.metadata() or {})[name])
            return {
                "name": name,
                "attribute": meta["attribute"],
                "intercept": meta["intercept"],
                "vector": sf.get_tensor(name).astype(float).tolist(),
            }
    except Exception:
        return None


def describe(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    c = entry["config"]
    return {
        "name": name,
        "family": c.get("family"),
        "resolution": c.get("resolution"),
        "output_shape": [c.get("resolution")] * 3 if c.get("resolution") else c.get("shape"),
        "modality": c.get("modality"),
        "spacing": c.get("spacing"),
        "latent_dim": c.get("latent_dim"),
        "classes": c.get("class_names", []),
        "intensity": c.get("intensity"),
        "directions": entry["directions"],
        "description": c.get("description", ""),
    }


# ---------------------------------------------------------------------------------------- app


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    storage = Storage(settings.storage_dir)
    if settings.redis_url:
        from service.queues import CeleryQueue

        jobs: Any = CeleryQueue(settings, storage)
    else:
        from service.queues import EmbeddedQueue

        jobs = EmbeddedQueue(settings, storage)

    stop_cleaner = threading.Event()

    def cleaner() -> None:
        """Results older than VOXGEN_RESULT_TTL_HOURS are deleted (records expire with them)."""
        ttl = settings.result_ttl_hours * 3600
        while True:
            try:
                if isinstance(jobs.records, MemoryRecords):
                    jobs.records.expire(ttl)
                running = {i for i in jobs.records.all_ids() if (r := jobs.records.get(i)) and r["state"] == "running"}
                storage.cleanup(ttl, keep=running)
            except Exception:  # storage or Redis briefly unavailable: next round
                pass
            if stop_cleaner.wait(min(600.0, max(5.0, ttl / 10))):
                return

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        t = threading.Thread(target=cleaner, name="voxgen-cleaner", daemon=True)
        t.start()
        yield
        stop_cleaner.set()
        jobs.close()

    app = FastAPI(
        title="voxgen",
        version="0.1.0",
        lifespan=lifespan,
        description="Generate, encode and edit high-resolution 3D medical volumes",
    )
    app.state.settings, app.state.storage, app.state.jobs = settings, storage, jobs

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = [{"loc": list(e.get("loc", [])), "msg": e.get("msg")} for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": errs})

    def models() -> dict[str, dict[str, Any]]:
        return list_models(settings.models_dir)

    def model_or_404(name: str) -> dict[str, Any]:
        m = models()
        if name not in m:
            raise HTTPException(404, f"unknown model {name!r}; served models: {', '.join(m) or '(none)'}")
        return m[name]

    def submit(kind: str, params: dict[str, Any], job_id: str | None = None) -> JobAccepted:
        job_id = job_id or new_job_id()
        jobs.records.put(new_record(job_id, kind, params))
        jobs.submit(job_id, 1, kind)
        return JobAccepted(job_id=job_id, status_url=f"/jobs/{job_id}")

    def check_label(cfg: dict[str, Any], label: str | int | None) -> None:
        names = cfg.get("class_names") or []
        if label is None:
            if names:
                raise HTTPException(422, f"this model is class-conditional: give label, one of {names}")
            return
        if not names:
            raise HTTPException(422, "this model is not class-conditional; do not give a label")
        ok = label in names if isinstance(label, str) else 0 <= label < len(names)
        if not ok:
            raise HTTPException(422, f"unknown label {label!r}; this model's classes: {names}")

    # -------------------------------------------------------------- routes
    @app.get("/models")
    def get_models() -> list[dict[str, Any]]:
        return [describe(n, e) for n, e in models().items()]

    @app.get("/models/{name}")
    def get_model(name: str) -> dict[str, Any]:
        return describe(name, model_or_404(name))

    @app.post("/generate", status_code=202)
    def generate(req: GenerateRequest) -> JobAccepted:
        cfg = model_or_404(req.model)["config"]
        if req.n > settings.max_n:
            raise HTTPException(422, f"n must be at most {settings.max_n}")
        check_label(cfg, req.label)
        params = req.model_dump()
        latent_dim = int(cfg.get("latent_dim", 0))
        if req.latent is not None:
            rows = req.latent if req.latent and isinstance(req.latent[0], list) else [req.latent]
            if any(len(r) != latent_dim for r in rows):
                raise HTTPException(422, f"latent must have {latent_dim} values per volume")
            if len(rows) > settings.max_n:
                raise HTTPException(422, f"at most {settings.max_n} latents per request")
            params["latent"], params["n"] = rows, len(rows)
        elif req.seed is None:
            params["seed"] = secrets.randbelow(2**63)
        return submit("generate", params)

    @app.post("/encode", status_code=202)
    async def encode(
        model: Annotated[str, Form()],
        file: Annotated[UploadFile, File()],
        reconstruct: Annotated[bool, Form()] = False,
        label: Annotated[str | None, Form()] = None,
    ) -> JobAccepted:
        cfg = model_or_404(model)["config"]
        check_label(cfg, label)
        name = file.filename or ""
        if "/" in name or "\\" in name or ".." in name:
            raise HTTPException(422, f"file name {name!r} must not contain a path")
        job_id = new_job_id()
        dst = storage.upload_path(job_id, name)
        limit = settings.max_upload_mb * 2**20
        size = 0
        with open(dst, "wb") as f:
            while chunk := await file.read(1 << 20):
                size += len(chunk)
                if size > limit:
                    f.close()
                    storage.delete_job(job_id)
                    raise HTTPException(413, f"upload over the limit of {settings.max_upload_mb} MB")
                f.write(chunk)
        from model.data.volumes import VolumeError, read_volume

        try:
            read_volume(dst, max_bytes=8 * limit)
        except VolumeError as e:
            storage.delete_job(job_id)
            raise HTTPException(422, str(e).replace(dst.name, name or "upload")) from None
        params = {"model": model, "upload": str(dst), "reconstruct": reconstruct, "label": label, "filename": name}
        return submit("encode", params, job_id)

    @app.post("/traverse", status_code=202)
    def traverse(req: TraverseRequest) -> JobAccepted:
        entry = model_or_404(req.model)
        cfg = entry["config"]
        check_label(cfg, req.label)
        latent_dim = int(cfg.get("latent_dim", 0))
        starts = [x is not None for x in (req.seed, req.latent, req.job_id)]
        if sum(starts) > 1:
            raise HTTPException(422, "give at most one of seed, latent, job_id")
        if (req.steps is None) == (req.target is None):
            raise HTTPException(422, "give either steps (a list of alphas) or target")
        params = req.model_dump()
        if isinstance(req.direction, str):
            d = _read_direction(settings.models_dir / req.model, req.direction)
            if d is None:
                raise HTTPException(
                    404,
                    f"model {req.model!r} has no direction {req.direction!r}; stored: {entry['directions'] or 'none'}",
                )
        else:
            if len(req.direction) != latent_dim or not any(req.direction):
                raise HTTPException(422, f"a direction vector needs {latent_dim} values, not all zero")
            if req.target is not None:
                raise HTTPException(422, "target needs a named (fitted) direction; a raw vector takes steps")
            d = {"name": "vector", "attribute": None, "vector": req.direction, "intercept": 0.0}
        params["direction"] = d
        if req.job_id is not None:
            src = jobs.records.get(req.job_id) if _is_id(req.job_id) else None
            if src is None or src["kind"] != "encode" or src["state"] != "succeeded":
                raise HTTPException(422, f"job_id {req.job_id!r} is not a succeeded encode job")
            if src["model"] != req.model:
                raise HTTPException(422, f"job {req.job_id} encoded with model {src['model']!r}, not {req.model!r}")
            params["latent"] = src["result"]["latent"]
        elif req.latent is not None:
            if len(req.latent) != latent_dim:
                raise HTTPException(422, f"latent must have {latent_dim} values")
        elif req.seed is None:
            params["seed"] = secrets.randbelow(2**63)
        return submit("traverse", params)

    @app.post("/admin/train", status_code=202)
    def admin_train(req: TrainRequest, authorization: Annotated[str | None, Header()] = None) -> JobAccepted:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise HTTPException(401, "admin token required (Authorization: Bearer <VOXGEN_ADMIN_TOKEN>)")
        token = authorization.split(" ", 1)[1].strip()
        if not settings.admin_token or not secrets.compare_digest(token, settings.admin_token):
            raise HTTPException(403, "wrong admin token")
        if req.name in models():
            raise HTTPException(409, f"a model named {req.name!r} is already served; choose another name")
        return submit("train", req.model_dump() | {"model": None})

    @app.get("/jobs/{job_id}")
    def job_status(job_id: str) -> dict[str, Any]:
        rec = jobs.records.get(job_id) if _is_id(job_id) else None
        if rec is None:
            raise HTTPException(404, f"no job {job_id!r}")
        out = {
            k: rec.get(k)
            for k in (
                "id",
                "kind",
                "model",
                "state",
                "progress",
                "result",
                "error",
                "attempt",
                "worker",
                "device",
                "created",
                "started",
                "finished",
            )
        }
        out["job_id"] = out.pop("id")
        return out

    @app.get("/jobs/{job_id}/files/{name}")
    def job_file(job_id: str, name: str) -> FileResponse:
        rec = jobs.records.get(job_id) if _is_id(job_id) else None
        if rec is None:
            raise HTTPException(404, f"no job {job_id!r}")
        listed = {f["name"] for f in (rec.get("result") or {}).get("files", [])}
        p = storage.file_path(job_id, name) if name in listed else None
        if p is None:
            raise HTTPException(404, f"job {job_id} has no result file {name!r}")
        media = "application/gzip" if name.endswith(".gz") else "application/octet-stream"
        return FileResponse(p, media_type=media, filename=name)

    @app.delete("/jobs/{job_id}")
    def cancel(job_id: str) -> dict[str, Any]:
        rec = jobs.records.get(job_id) if _is_id(job_id) else None
        if rec is None:
            raise HTTPException(404, f"no job {job_id!r}")
        if rec["state"] not in TERMINAL:
            jobs.records.update(job_id, state="cancelled", finished=time.time())
        return job_status(job_id)

    @app.get("/health/live")
    def live() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health/ready")
    def ready() -> JSONResponse:
        checks = {}
        for name, fn in (("queue", jobs.ping), ("storage", storage.ping)):
            try:
                checks[name] = bool(fn())
            except Exception as e:
                checks[name] = False
                checks[f"{name}_error"] = str(e)[:200]
        ok = checks["queue"] and checks["storage"]
        return JSONResponse(status_code=200 if ok else 503, content={"ready": ok, "backend": jobs.kind, **checks})

    return app


def _is_id(job_id: str) -> bool:
    return len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id)


def settings_dependency() -> Settings:  # for routes added by extensions
    return get_settings()


__all__ = ["create_app", "Depends"]
