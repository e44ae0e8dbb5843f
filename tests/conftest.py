"""Shared fixtures.  Each block belongs to one part of the suite; append, do not rewrite."""

from __future__ import annotations

import os

# Generation arithmetic is pinned to fp32 for the suite: 'auto' would take bf16 on CPUs with AVX-512
# BF16 or AMX and fp32 elsewhere, so bit-for-bit comparisons would hold on some CI machines only.
# Worker processes and CLI subprocesses inherit it; tests/test_precision.py tests auto and bf16.
os.environ.setdefault("VOXGEN_PRECISION", "fp32")

# Under pytest-xdist (`make test` runs `pytest -n 2`) each worker process gets its share of the cores
# for torch's threads, set before torch is imported so that this process and the CLI, Celery and
# torchrun processes the tests start (they inherit the environment) all use it: two workers at the full
# thread count each would oversubscribe the cores, and OpenMP's spinning threads then slow both.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_share)
    os.environ["MKL_NUM_THREADS"] = str(_share)

# ------------------------------------------------------------------------------------ service
# Fixtures and helpers for tests/test_api.py and tests/test_worker_integration.py: tiny models, an
# app on the embedded queue, a real redis-server on a free port.
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from benchmarks._common import free_port as _free_port  # noqa: F401  (tests import it from here)
from benchmarks._common import start_redis

SERVICE_LATENT = 16


def service_wait(client, job_id: str, timeout: float = 300) -> dict:  # noqa: ANN001
    """Poll GET /jobs/{id} until the job is finished; the final status."""
    t, s = time.time(), None
    while time.time() - t < timeout:
        s = client.get(f"/jobs/{job_id}").json()
        if s["state"] in ("succeeded", "failed", "cancelled"):
            return s
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish: {s}")


def service_nifti_upload(tmp: Path, shape: tuple[int, int, int] = (32, 32, 32)) -> bytes:
    """The bytes of a small CT-like .nii.gz: a soft-tissue ball in air, 2 mm voxels."""
    import nibabel as nib

    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    v = np.where(x**2 + y**2 + z**2 < 0.6, 40.0, -1000.0).astype(np.float32)
    p = tmp / "scan.nii.gz"
    nib.save(nib.Nifti1Image(v.transpose(2, 1, 0).copy(), np.diag([2.0, 2.0, 2.0, 1.0])), p)
    return p.read_bytes()


@pytest.fixture(scope="session")
def service_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny (128^3 CT, with a direction), cond (class-conditional), big (256^3, slow enough to kill)."""
    import torch

    from model.hagan.config import HAGANConfig
    from model.hagan.model import HAGANModel
    from model.latent.directions import Direction, save_direction

    d = tmp_path_factory.mktemp("service-models")
    cfg = HAGANConfig(resolution=128, width=0.25, latent_dim=SERVICE_LATENT)
    HAGANModel.init(cfg, seed=0).save_pretrained(d / "tiny")
    HAGANModel.init(
        HAGANConfig(resolution=128, width=0.25, latent_dim=SERVICE_LATENT, class_names=["healthy", "copd"]), seed=1
    ).save_pretrained(d / "cond")
    direction = Direction("soft", "soft_tissue_ml", torch.linspace(-1, 1, SERVICE_LATENT), 5.0, 0.9, None, 64)
    save_direction(d / "tiny", direction)
    HAGANModel.init(HAGANConfig(resolution=256, width=0.25, latent_dim=SERVICE_LATENT), seed=2).save_pretrained(
        d / "big"
    )
    return d


@pytest.fixture(scope="session")
def embedded(service_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A TestClient on the app with the embedded in-process queue (no Redis)."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    s = Settings(
        models_dir=service_models_dir,
        storage_dir=tmp_path_factory.mktemp("embedded-storage"),
        redis_url=None,
        admin_token="s3cret",
        max_upload_mb=1,
    )
    with TestClient(create_app(s)) as c:
        yield c


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free port (no persistence), stopped at the end of the session."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (`make redis-server` or `apt-get install redis-server`)")
    try:
        proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    except RuntimeError as e:
        pytest.fail(str(e))
    yield url
    proc.terminate()
    proc.wait(10)


# ------------------------------------------------------------------------------------ (end of service)


# ------------------------------------------------------------------------------------ uvicorn
# A real uvicorn server in a thread on a port the OS picked, for tests that need real HTTP
# (tests/test_health_ready.py, tests/test_viewer.py).
from contextlib import contextmanager  # noqa: E402


@contextmanager
def uvicorn_server(app, name: str = "test-uvicorn") -> Iterator[str]:  # noqa: ANN001
    """Serve ``app`` until the block ends; yields its base URL (no trailing slash)."""
    import threading

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, name=name, daemon=True)
    thread.start()
    for _ in range(600):
        if srv.started or not thread.is_alive():
            break
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(30)
        sock.close()


# ------------------------------------------------------------------------------------ training
# tests/test_recipe.py and tests/test_distributed.py: four synthetic brains of slightly different
# voxel sizes, prepared by the physical-units path (128^3).
@pytest.fixture(scope="module")
def brain_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.data.datasets import prepare_dataset
    from tests.test_recipe import _brain, _config, _save

    root = tmp_path_factory.mktemp("brains")
    for i in range(4):
        _save(_brain(seed=i), root / "src" / f"s{i}.nii.gz", zooms=(1.5 + 0.05 * i,) * 3)
    prepare_dataset(root / "src", root / "ds", _config())
    return root / "ds"


# ------------------------------------------------------------------------------------ torch threads
# Modules of small networks (tests/test_alphawgan.py, test_evaluate.py, test_metrics.py, test_distributed.py,
# test_stylegan3d.py, test_stylegan3d_train.py) take this with `pytestmark = pytest.mark.usefixtures("one_thread")`.
@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Small networks run faster on one thread; the thread count is restored for the next module."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
