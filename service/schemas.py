"""The API's contract: pydantic v2 request and response models (they make the OpenAPI at /docs)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from model import families
from model.latent import REFINE_ROUNDS

# Latent codes are drawn from N(0, 1); a value far outside that is a mistake, and an enormous one
# would overflow inside the network (NaN volumes) instead of being refused with a 4xx: the routes
# refuse it (worker/params.py latent_rows, the one latent check).
LATENT_LIMIT = 1000.0
ALPHA_LIMIT = 1e4
TARGET_LIMIT = 1e6  # a traverse target (an attribute value: mL, HU, ...) beyond this is a mistake
MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# Request bodies are validated strictly, as the published schema reads: a number where it says
# number, a string where it says string.  Without it pydantic would take ``"seed": true`` as seed 1
# and ``"n": "2"`` as 2.  An integer is still taken where a number is asked, and -- JSON Schema's
# integer being any whole number -- 5.0 where an integer is (``Int``); 5.5, true and "5" are not.
STRICT = ConfigDict(strict=True)
SEED_MAX = 2**63 - 1


def _json_integer(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


Int = Annotated[int, BeforeValidator(_json_integer)]
# (constraints before the validator, or pydantic cannot state them in the schema of an optional)
Seed = Annotated[int, Field(ge=0, le=SEED_MAX), BeforeValidator(_json_integer)]
Batch = Annotated[int, Field(ge=1, le=64), BeforeValidator(_json_integer)]
LatentDim = Annotated[int, Field(ge=1, le=8192), BeforeValidator(_json_integer)]
# the limits the validators below check, stated in the schema too (their messages stay theirs)
LatentValue = Annotated[float, WithJsonSchema({"type": "number", "minimum": -LATENT_LIMIT, "maximum": LATENT_LIMIT})]
Alpha = Annotated[float, WithJsonSchema({"type": "number", "minimum": -ALPHA_LIMIT, "maximum": ALPHA_LIMIT})]


def _check_values(values: list[float], what: str, limit: float) -> None:
    for x in values:
        if not math.isfinite(x):
            raise ValueError(f"{what} contains NaN or infinite values")
        if abs(x) > limit:
            raise ValueError(f"{what} values must lie within +-{limit:g}")


OutputFormat = Literal["nifti", "npy", "nrrd", "mha", "dicom"]
FORMAT_DESCRIPTION = (
    "nifti: .nii.gz per volume in physical units (CT int16 HU) with the model's affine; nrrd / mha: the same "
    "voxels and geometry as single-file NRRD / MetaImage; dicom: one zip (dicom.zip) holding one DICOM series "
    "per volume (one folder each; CT Image Storage in HU or MR Image Storage, int16 with a rescale), marked "
    "synthetic; npy: the raw float32 model-space array"
)


class GenerateRequest(BaseModel):
    model_config = STRICT

    model: str = Field(description="a served model's name (GET /models)")
    n: Int = Field(1, ge=1, description="number of volumes (ignored when latent gives several rows)")
    seed: Seed | None = Field(None, description="random seed; drawn and returned when absent")
    latent: list[LatentValue] | list[list[LatentValue]] | None = Field(
        None, description="one latent code, or one per volume, instead of a seed"
    )
    label: str | Int | None = Field(None, description="class name or index, for class-conditional models")
    format: OutputFormat = Field("nifti", description=FORMAT_DESCRIPTION)
    # the latent's values, length and rows are checked once, by the route (worker/params.py latent_rows)


class TraverseRequest(BaseModel):
    model_config = STRICT

    model: str
    seed: Seed | None = None
    latent: list[LatentValue] | None = None
    job_id: str | None = Field(None, description="a succeeded encode job whose latent to start from")
    direction: str | list[LatentValue] = Field(description="a stored direction's name (GET /models/{name}) or a vector")
    steps: list[Alpha] | None = Field(None, min_length=1, max_length=32, description="alphas along the unit direction")
    target: float | None = Field(
        None,
        ge=-TARGET_LIMIT,
        le=TARGET_LIMIT,
        description="attribute value to reach (named directions only); refused (422) when it lies more "
        "than 1e4 unit steps from the start, the bound of steps",
    )
    n_steps: Int = Field(5, ge=1, le=32, description="volumes between the start and the target")
    refine: Int = Field(
        REFINE_ROUNDS,
        ge=0,
        le=8,
        description="with target: at most this many extra volumes generated and measured to correct the direction's "
        "linear step, so the measured attribute (not only the prediction) ends at the target (within 2 % of the "
        "distance where the model allows); 0: the linear step alone. The result's refine lists what was tried",
    )
    label: str | Int | None = None
    format: OutputFormat = Field("nifti", description=FORMAT_DESCRIPTION)

    # the latent and a direction vector are checked by the route (worker/params.py latent_rows)

    @field_validator("steps")
    @classmethod
    def _finite_steps(cls, v: Any) -> Any:
        if v is not None:
            _check_values(v, "steps", ALPHA_LIMIT)
        return v

    @field_validator("target")
    @classmethod
    def _finite_target(cls, v: Any) -> Any:
        if v is not None and not math.isfinite(v):
            raise ValueError("target must be a finite number")
        return v


class TrainRequest(BaseModel):
    model_config = STRICT

    family: Literal[families.NAMES] = "hagan"  # type: ignore[valid-type]
    data: str = Field(description="a dataset folder made by `voxgen prepare`, as the worker sees it")
    name: str = Field(pattern=MODEL_NAME, description="the new model's served name")
    resolution: Annotated[Literal[128, 256, 512] | None, BeforeValidator(_json_integer)] = None
    iterations: Int = Field(1000, ge=1, le=10_000_000)
    batch: Batch | None = Field(None, description="default: the family's (hagan 2)")
    width: float | None = Field(None, gt=0, le=4, description="hagan: channel width multiplier (default 1.0)")
    latent_dim: LatentDim | None = Field(None, description="hagan 1024, alphawgan 1000 by default")
    seed: Seed = 0
    lr: float | None = Field(
        None,
        gt=0,
        le=1,
        description="learning rate of alphawgan, splitshuffle and stylegan3d (default: the paper's); hagan refuses it "
        "(its G, D and encoders have rates of their own, the paper's)",
    )
    shape: str | None = Field(None, pattern=r"^\d{1,4}x\d{1,4}x\d{1,4}$", description="stylegan: DxHxW grid")
    variant: str | None = Field(None, max_length=32, description="stylegan: the paper's architecture variant")
    dims: Annotated[Literal[2, 3], BeforeValidator(_json_integer)] = 3
    init_from: str | None = Field(
        None,
        description="hagan: a model directory (or run folder), as the worker sees it, whose weights start the run "
        "(fine-tuning; `voxgen train --init-from`); stylegan: a 2D run or model directory to inflate from",
    )
    freeze_g: Literal["on", "off"] | None = Field(
        None,
        description="hagan: on = only the encoders train, through the frozen G of init_from (`voxgen train "
        "--freeze-g`); its samples stay bit for bit",
    )
    objective: Literal["gan", "glo"] | None = Field(
        None,
        description="hagan: gan (default, the paper's game) or glo: G alone, fitted with a latent code per training "
        "volume, serving the codes' Gaussian (`voxgen train --objective glo`); its encoders are trained afterwards "
        "by a run with init_from and freeze_g on",
    )
    code_noise: float | None = Field(
        None, ge=0, le=100, description="hagan, objective glo: sd of Gaussian noise on the codes on their way into G"
    )
    inflate: str = Field("inflate-1", max_length=32)
    inflate_parts: Literal["g", "d", "gd"] = "gd"
    recipe: Literal["authors", "small-data"] | None = Field(
        None,
        description="authors (default): the paper's training; small-data (every family): augmentation of the real "
        "volumes, DiffAugment on the discriminator's inputs, an EMA of G that is served, and the quality monitor, "
        "which keeps the best model (hagan adds its own parts; `voxgen train --help`)",
    )
    processes: Int = Field(
        1,
        ge=1,
        le=16,
        description="training processes on the worker (hagan, splitshuffle, stylegan3d): > 1 runs them under "
        "torch.distributed.run, one per GPU on CUDA (the worker needs that many) or sharing the CPU; batch must be "
        "a multiple of it",
    )

    @model_validator(mode="after")
    def _family_options(self) -> TrainRequest:
        if self.family == "hagan" and self.lr is not None:
            from model.hagan.config import LR_REFUSAL

            raise ValueError(LR_REFUSAL)
        hagan_only = [k for k in ("freeze_g", "objective", "code_noise") if getattr(self, k) is not None]
        if self.family != "hagan" and hagan_only:
            raise ValueError(f"{', '.join(hagan_only)}: hagan options; this run trains {self.family}")
        if self.freeze_g == "on" and not self.init_from:
            raise ValueError("freeze_g on trains the encoders of a trained G: it needs init_from (a model directory)")
        if self.objective == "glo" and (self.init_from or self.freeze_g == "on"):
            raise ValueError(
                "objective glo fits G from scratch (no init_from, no freeze_g); train its encoders afterwards with "
                "init_from and freeze_g on"
            )
        if self.code_noise and self.objective != "glo":
            raise ValueError("code_noise is an option of objective glo")
        return self


class JobAccepted(BaseModel):
    job_id: str
    status_url: str


class Progress(BaseModel):
    done: int
    total: int
    stage: str


class ResultFile(BaseModel):
    name: str
    url: str
    bytes: int


class JobResult(BaseModel, extra="allow"):
    """Files (each complete once listed) plus small inline values: ``latent`` for encode jobs,
    ``steps`` for traverse jobs, ``seed`` for generate jobs, ``model`` for training jobs."""

    files: list[ResultFile]
    latent: list[float] | None = None
    provenance: str | None = Field(
        None,
        description="the URL of provenance.json (one of the files): model and sha256 of its weights, voxgen "
        "version, seed or latent, the request's parameters, device, precision, threads, times",
    )


class JobStatus(BaseModel):
    job_id: str
    kind: str
    model: str | None = None
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: Progress
    result: JobResult | None = None
    error: str | None = None
    attempt: int = 1
    worker: str | None = None
    device: str | None = None
    threads: int | None = Field(
        None,
        description="CPU threads the job ran on (VOXGEN_THREADS): part of what makes a seed reproducible",
    )
    gpu_peak_bytes: int | None = Field(None, description="peak CUDA memory of the run (CUDA workers only)")
    created: float | None = None
    started: float | None = None
    finished: float | None = None


class JobDeleted(JobStatus):
    """DELETE /jobs/{id}: the job as it stands after the call, and what the call did."""

    action: Literal["cancelled", "deleted"] = Field(
        description="cancelled: the job was queued or running and is now cancelled (its record stays "
        "until the TTL); deleted: the job had finished, and its result files and record are deleted"
    )


class Readiness(BaseModel):
    """GET /health/ready: 200 with ready true, or 503 with ready false and the failing check."""

    ready: bool
    backend: Literal["embedded", "celery"]
    queue: bool
    storage: bool
    queue_error: str | None = None
    storage_error: str | None = None


class ModelInfo(BaseModel):
    name: str
    family: str | None = None
    resolution: int | None = None
    output_shape: list[int] | None = None
    modality: str | None = None
    spacing: list[float] | None = None
    latent_dim: int | None = None
    classes: list[str] = []
    intensity: dict[str, Any] | None = None
    directions: list[str] = []
    description: str = ""
    card_url: str | None = Field(
        None, description="GET it for the model card (markdown: data, training, measured figures, limits); null: none"
    )
