"""Typed job parameters, shared by the API (service/) and the workers (worker/).

A route validates a request once -- the body against its schema (service/schemas.py), then what
needs the model (the latent with ``latent_rows``, the label, the direction) -- and submits one of
these models; the record carries it as JSON (``dump``), and the worker parses it back into the
same model (``parse``) and hands it to the job function.  Nothing is re-checked on the way: the
worker trusts what the API validated (the loaded models still check a latent's shape and values
for direct library users, model/base.py ``check_latent``).

Importing this module imports no torch (the API in Celery mode never loads it)."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from model.latent import MAX_FIT_STEPS, REFINE_ROUNDS
from service.schemas import LATENT_LIMIT, OutputFormat, TrainRequest


class ParamError(ValueError):
    """A request value that does not fit the model (a 422 at the API); the message says why."""


def latent_rows(
    value: list[float] | list[list[float]], latent_dim: int, *, max_rows: int | None = None, what: str = "latent"
) -> list[list[float]]:
    """The one check of a latent given to the service: one row or a list of rows, each of
    ``latent_dim`` finite values within +-LATENT_LIMIT (larger ones overflow inside the networks),
    at most ``max_rows`` rows (given for /generate, whose rows are volumes).  Returns the rows;
    ``ParamError`` otherwise (``what`` names the field in the message)."""
    many = bool(value) and isinstance(value[0], list)
    rows: list[list[float]] = value if many else [value]  # type: ignore[assignment,list-item]
    if max_rows is not None and len(rows) > max_rows:
        raise ParamError(f"at most {max_rows} latents per request (VOXGEN_MAX_N)")
    if any(len(r) != latent_dim for r in rows):
        raise ParamError(f"{what} must have {latent_dim} values" + (" per volume" if max_rows is not None else ""))
    for row in rows:
        for x in row:
            if not math.isfinite(x):
                raise ParamError(f"{what} contains NaN or infinite values")
            if abs(x) > LATENT_LIMIT:
                raise ParamError(f"{what} values must lie within +-{LATENT_LIMIT:g}")
    return rows


class JobParams(BaseModel):
    """What every job kind's parameters share: the served model's name (None for training)."""

    model_config = ConfigDict(extra="ignore")  # a record written by an older API still parses
    kind: ClassVar[str]

    model: str | None

    def dump(self) -> dict[str, Any]:
        """The JSON the job record carries (service/routes/common.py ``submit``)."""
        return self.model_dump(mode="json")


class GenerateParams(JobParams):
    """POST /generate as the job runs it: a seed (drawn by the API when the request had none) and
    ``n``, or the latent rows (``n`` is their count); the label resolved to a class name."""

    kind: ClassVar[str] = "generate"

    model: str
    n: int = Field(1, ge=1)
    seed: int | None = None
    latent: list[list[float]] | None = None
    label: str | None = None
    format: OutputFormat = "nifti"

    @model_validator(mode="after")
    def _seed_or_latent(self) -> GenerateParams:
        if self.seed is None and self.latent is None:
            raise ValueError("needs a seed or a latent")
        return self


class EncodeParams(JobParams):
    """POST /encode as the job runs it: the stored upload (a path the worker's storage resolves),
    the sender's file name (messages name it, never the path), the voxel bound it was checked with."""

    kind: ClassVar[str] = "encode"

    model: str
    upload: str
    filename: str
    reconstruct: bool = False
    label: str | None = None
    space: Literal["input", "model"] = "input"
    series_uid: str | None = None
    max_voxels: int | None = None
    steps: int | None = Field(None, ge=0, le=MAX_FIT_STEPS)  # None: the family's default (model.encode)


class DirectionParams(BaseModel):
    """A traverse direction as the job gets it: a stored one (read by the API) or the request's vector."""

    name: str = "vector"
    attribute: str | None = None
    vector: list[float]
    intercept: float = 0.0


class TraverseParams(JobParams):
    """POST /traverse as the job runs it: a seed or a latent (given, or an encode job's), the
    direction resolved, ``steps`` or ``target``, the label resolved to a class name."""

    kind: ClassVar[str] = "traverse"

    model: str
    seed: int | None = None
    latent: list[float] | None = None
    job_id: str | None = None
    direction: DirectionParams
    steps: list[float] | None = None
    target: float | None = None
    n_steps: int = 5
    refine: int = REFINE_ROUNDS
    label: str | None = None
    format: OutputFormat = "nifti"

    @model_validator(mode="after")
    def _seed_or_latent(self) -> TraverseParams:
        if self.seed is None and self.latent is None:
            raise ValueError("needs a seed or a latent")
        return self


class TrainRun(BaseModel):
    """Where a training job runs, given by the worker (never part of the record or provenance)."""

    models_dir: str
    storage_root: str
    job_id: str
    device: str = "auto"


class TrainParams(TrainRequest, JobParams):  # type: ignore[misc]
    """POST /admin/train as the job runs it: the request's fields (service/schemas.py ``TrainRequest``,
    so a field added there travels too), ``model`` None (the model is ``name`` once trained), and
    ``run``, set by the worker."""

    model_config = ConfigDict(strict=False, extra="ignore")
    kind: ClassVar[str] = "train"

    model: None = None
    run: TrainRun | None = Field(None, exclude=True)


PARAMS: dict[str, type[JobParams]] = {p.kind: p for p in (GenerateParams, EncodeParams, TraverseParams, TrainParams)}


def parse(kind: str, params: dict[str, Any]) -> JobParams:
    """A record's ``params`` back into its kind's model.  ``ParamError`` (naming the fields, not
    their values: an upload's value is a server path) when they do not fit."""
    if kind not in PARAMS:
        raise ParamError(f"unknown job kind {kind!r}; known: {', '.join(PARAMS)}")
    try:
        return PARAMS[kind].model_validate(params)
    except ValidationError as e:
        where = ", ".join(
            ".".join(str(x) for x in err["loc"]) or err["msg"].removeprefix("Value error, ") for err in e.errors()
        )
        raise ParamError(f"the {kind} job's parameters do not fit ({where})") from None


__all__ = [
    "PARAMS",
    "DirectionParams",
    "EncodeParams",
    "GenerateParams",
    "JobParams",
    "ParamError",
    "TrainParams",
    "TrainRun",
    "TraverseParams",
    "latent_rows",
    "parse",
]
