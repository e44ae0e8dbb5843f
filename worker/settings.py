"""Service settings from the environment (prefix VOXGEN_)."""

from __future__ import annotations

import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_MODELS = Path(__file__).resolve().parent.parent / "models"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VOXGEN_", protected_namespaces=())

    models_dir: Path = REPO_MODELS
    storage_dir: Path = Path("var/storage")
    redis_url: str | None = None
    admin_token: str | None = None
    max_upload_mb: int = 512
    # An uploaded scan may have at most this many voxels (read from its header, before anything is
    # inflated; 512^3).  Checking it holds one float32 copy (512 MiB at the limit) in the API process.
    max_input_voxels: int = Field(default=512**3, ge=8**3)
    result_ttl_hours: float = 24.0
    job_lease_seconds: float = 30.0
    # Redis redelivers an unacknowledged message after this; it must exceed the longest job (a
    # training run).  Lost jobs come back much sooner through the lease (worker/store.py).
    visibility_timeout_hours: float = 72.0
    device: str = "auto"
    # CPU threads for a job's arithmetic (torch intra-op threads), pinned by the embedded queue and
    # every Celery worker before each job: same model, seed, device and thread count -> the same
    # volume, bit for bit.  0 = every CPU this process may run on (its affinity mask).
    threads: int = Field(default=0, ge=0)
    # generation arithmetic (HA-GAN): auto = bf16 on CPUs with AVX-512 BF16 or AMX, fp32 elsewhere
    # (AVX2-only CPUs and CUDA); fp32 | bf16 force it.  The error of bf16 is in the README.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # HA-GAN: G^H runs on the whole volume when it needs at most this much memory, else in slabs with
    # the same output (512^3 at the authors' width needs slabs on a 24 GiB machine or a 16 GB GPU)
    memory_budget_mb: int = Field(default=1024, ge=64)
    max_n: int = 16
    # Shared object storage for several machines: s3://bucket/prefix (results and uploads go there;
    # storage_dir is then only this machine's spool for uploads in flight, scratch and training runs).
    # Credentials come from the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    # AWS_DEFAULT_REGION) or an instance role; an S3-compatible server (MinIO, ...) by its endpoint.
    storage_url: str | None = None
    s3_endpoint_url: str | None = None
    s3_part_mb: int = 16  # multipart upload part size (S3 requires >= 5 MiB except for the last part)
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
    # a Celery worker touches this file whenever its reaper round reached Redis (every lease/3 s):
    # the container health check / liveness probe reads its age (a solo-pool worker busy with a long
    # job cannot answer `celery inspect ping`, and must not be restarted for that)
    heartbeat_file: Path = Path(tempfile.gettempdir()) / "voxgen-worker.alive"


def job_threads(threads: int = 0) -> int:
    """The CPU thread count a job runs with: ``threads`` if positive, else the CPUs this process may
    use (``os.sched_getaffinity``; ``os.cpu_count`` where that does not exist)."""
    if threads > 0:
        return int(threads)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


@lru_cache
def get_settings() -> Settings:
    return Settings()


def celery_conf(s: Settings) -> dict:
    """Celery configuration shared by the workers and the API's sending client."""
    return {
        "task_acks_late": True,  # a message is acknowledged only after its job ran
        "task_reject_on_worker_lost": True,  # a worker killed mid-job does not ack its message
        "worker_prefetch_multiplier": 1,  # a process reserves one job at a time: none waits behind a long one
        "task_ignore_result": True,  # results are files in storage and small records in Redis
        "broker_transport_options": {"visibility_timeout": int(s.visibility_timeout_hours * 3600)},
        "task_default_queue": "gpu",
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
    }
