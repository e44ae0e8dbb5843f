"""The API's contract: every error body in the shape the OpenAPI document states, every error status
documented on the routes that answer it, strict seeds, the 405 Allow header, DELETE /jobs/{id}
(cancel a queued or running job, delete a finished one), and a bounded schemathesis run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.errors import Error, ValidationFailed
from tests.conftest import SERVICE_LATENT as LATENT
from tests.conftest import service_nifti_upload as nifti_upload
from tests.conftest import service_wait as wait

ADMIN = {"Authorization": "Bearer s3cret"}


def _documented(spec: dict[str, Any], method: str, path: str, status: int) -> str:
    """The component schema name the OpenAPI document gives for this answer (fails if none)."""
    responses = spec["paths"][path][method.lower()]["responses"]
    assert str(status) in responses, f"{method} {path} does not document {status}: {sorted(responses)}"
    ref = responses[str(status)]["content"]["application/json"]["schema"]["$ref"]
    return ref.rsplit("/", 1)[-1]


def _check_error(spec: dict[str, Any], method: str, path: str, r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    name = _documented(spec, method, path, status)
    model = ValidationFailed if status == 422 else Error
    assert name == model.__name__
    model.model_validate(body)
    assert set(body) == set(model.model_fields), body  # exactly the documented fields
    return body


def _idle(client: TestClient, timeout: float = 120) -> None:
    t = time.time()
    while client.app.state.jobs.pending() and time.time() - t < timeout:
        time.sleep(0.1)


def test_error_bodies_follow_the_documented_shapes(embedded: TestClient, tmp_path: Path) -> None:
    spec = embedded.get("/openapi.json").json()
    assert "HTTPValidationError" not in json.dumps(spec)  # no route documents a 422 shape we never send
    # 404
    b = _check_error(spec, "GET", "/models/{name}", embedded.get("/models/nope"), 404)
    assert "unknown model" in b["detail"]
    _check_error(spec, "POST", "/generate", embedded.post("/generate", json={"model": "nope"}), 404)
    _check_error(spec, "GET", "/jobs/{job_id}", embedded.get("/jobs/" + "0" * 32), 404)
    _check_error(spec, "DELETE", "/jobs/{job_id}", embedded.delete("/jobs/" + "0" * 32), 404)
    _check_error(spec, "GET", "/jobs/{job_id}/files/{name}", embedded.get(f"/jobs/{'0' * 32}/files/x.npy"), 404)
    body = {"model": "tiny", "seed": 1, "direction": "nope", "steps": [1.0]}
    _check_error(spec, "POST", "/traverse", embedded.post("/traverse", json=body), 404)
    # 422 from the framework's validation: every item has loc, msg and type
    b = _check_error(spec, "POST", "/generate", embedded.post("/generate", json={"seed": 1}), 422)
    assert b["errors"] == [{"loc": ["body", "model"], "msg": "Field required", "type": "missing"}]
    assert "body.model: Field required" in b["detail"]
    r = embedded.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert _check_error(spec, "POST", "/generate", r, 422)["errors"][0]["type"] == "json_invalid"
    # 422 from the routes' own checks: the same shape, at the field concerned
    r = embedded.post("/generate", json={"model": "tiny", "latent": [0.0] * 3})
    b = _check_error(spec, "POST", "/generate", r, 422)
    assert b["errors"][0]["loc"] == ["body", "latent"] and "latent must have" in b["detail"]
    r = embedded.post("/generate", json={"model": "cond", "seed": 1})
    assert _check_error(spec, "POST", "/generate", r, 422)["errors"][0]["loc"] == ["body", "label"]
    r = embedded.post("/traverse", json={"model": "tiny", "direction": "soft"})
    assert "steps" in _check_error(spec, "POST", "/traverse", r, 422)["detail"]
    r = embedded.post("/encode", data={"model": "tiny"}, files={"file": ("a/b.nii.gz", nifti_upload(tmp_path))})
    _check_error(spec, "POST", "/encode", r, 422)
    r = embedded.post("/encode", data={"model": ""}, files={"file": ("scan.nii.gz", b"x")})
    assert _check_error(spec, "POST", "/encode", r, 422)["errors"][0]["loc"] == ["body", "model"]
    # 400: a body that cannot be parsed
    r = embedded.post("/encode", content=b"--x--", headers={"content-type": "multipart/form-data"})
    assert "boundary" in _check_error(spec, "POST", "/encode", r, 400)["detail"]
    r = embedded.post("/generate", content=b"\xff\xfe\x00", headers={"content-type": "application/json"})
    _check_error(spec, "POST", "/generate", r, 400)
    # 413: over the body limit (declared length, refused before reading)
    r = embedded.post("/generate", content=b"[" + b"0," * 2**23 + b"0]", headers={"content-type": "application/json"})
    _check_error(spec, "POST", "/generate", r, 413)
    r = embedded.post("/encode", data={"model": "tiny"}, files={"file": ("scan.nii.gz", b"x" * (2 * 2**20))})
    _check_error(spec, "POST", "/encode", r, 413)
    # 401, 403, 409 on the admin route
    train = {"data": "x", "name": "tiny"}
    b = _check_error(spec, "POST", "/admin/train", embedded.post("/admin/train", json=train), 401)
    assert "admin token required" in b["detail"]
    r = embedded.post("/admin/train", json=train, headers={"Authorization": "Bearer wrong"})
    _check_error(spec, "POST", "/admin/train", r, 403)
    r = embedded.post("/admin/train", json=train, headers=ADMIN)
    assert "already served" in _check_error(spec, "POST", "/admin/train", r, 409)["detail"]


def test_ready_and_files_are_documented(embedded: TestClient) -> None:
    spec = embedded.get("/openapi.json").json()
    ready = spec["paths"]["/health/ready"]["get"]["responses"]
    assert {"200", "503"} <= set(ready)
    assert ready["503"]["content"]["application/json"]["schema"]["$ref"].endswith("/Readiness")
    files = spec["paths"]["/jobs/{job_id}/files/{name}"]["get"]["responses"]["200"]["content"]
    assert {"application/gzip", "image/png", "application/json", "application/octet-stream"} <= set(files)
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


@pytest.mark.parametrize("seed", [True, False, "5", 1.5, -1, 2**63, None])
def test_seeds_are_strict_everywhere(embedded: TestClient, seed: Any) -> None:
    bodies = {
        "/generate": {"model": "tiny", "seed": seed, "format": "npy"},
        "/traverse": {"model": "tiny", "seed": seed, "direction": "soft", "steps": [0.0]},
        "/admin/train": {"data": "x", "name": "strict-seed-model", "seed": seed},
    }
    for path, body in bodies.items():
        r = embedded.post(path, json=body, headers=ADMIN)
        if seed is None and path == "/admin/train":  # the train seed is not optional
            assert r.status_code == 422
            continue
        if seed is None:
            assert r.status_code == 202, r.text
            continue
        assert r.status_code == 422, (path, seed, r.text)
        assert ["body", "seed"] in [e["loc"] for e in r.json()["errors"]], r.text


def test_whole_numbers_are_integers_as_json_schema_says(embedded: TestClient) -> None:
    r = embedded.post("/generate", json={"model": "tiny", "seed": 7.0, "n": 1.0, "format": "npy"})
    assert r.status_code == 202, r.text
    s = wait(embedded, r.json()["job_id"])
    assert s["state"] == "succeeded" and s["result"]["seed"] == 7 and isinstance(s["result"]["seed"], int)
    for body in ({"n": "1"}, {"n": True}, {"label": True}, {"latent": [True] * LATENT}):
        r = embedded.post("/generate", json={"model": "tiny", "format": "npy"} | body)
        assert r.status_code == 422, (body, r.text)


@pytest.mark.parametrize(
    "path,allowed",
    [("/jobs/" + "a" * 32, "DELETE, GET"), ("/generate", "POST"), ("/models", "GET"), ("/health/ready", "GET")],
)
def test_405_allow_lists_every_method_of_the_path(embedded: TestClient, path: str, allowed: str) -> None:
    for method in ("PATCH", "PUT", "OPTIONS"):
        r = embedded.request(method, path)
        assert r.status_code == 405, (method, path, r.text)
        assert r.headers["allow"] == allowed, (method, path)
        Error.model_validate(r.json())


def test_delete_cancels_a_queued_or_running_job_and_deletes_a_finished_one(embedded: TestClient) -> None:
    storage = embedded.app.state.storage
    # finished: its files and its record are deleted at once
    jid = embedded.post("/generate", json={"model": "tiny", "seed": 3, "format": "npy"}).json()["job_id"]
    done = wait(embedded, jid)
    assert done["state"] == "succeeded" and storage.job_dir(jid).is_dir()
    r = embedded.delete(f"/jobs/{jid}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["action"] == "deleted" and body["job_id"] == jid and body["state"] == "succeeded"
    assert body["result"]["files"] == done["result"]["files"]  # the job as it was
    assert not storage.job_dir(jid).exists()
    assert embedded.get(f"/jobs/{jid}").status_code == 404
    assert embedded.get(f"/jobs/{jid}/files/latent.npy").status_code == 404
    assert embedded.delete(f"/jobs/{jid}").status_code == 404
    # queued or running: cancelled, the record stays (the web page's cancel button reads it)
    jid = embedded.post("/generate", json={"model": "big", "seed": 1, "n": 3, "format": "npy"}).json()["job_id"]
    r = embedded.delete(f"/jobs/{jid}")
    assert r.status_code == 200 and r.json()["action"] == "cancelled" and r.json()["state"] == "cancelled"
    _idle(embedded)
    s = embedded.get(f"/jobs/{jid}").json()
    assert s["state"] == "cancelled" and "result" not in s and not storage.job_dir(jid).exists()
    # a cancelled job is finished: a second DELETE removes it
    r = embedded.delete(f"/jobs/{jid}")
    assert r.json()["action"] == "deleted" and r.json()["state"] == "cancelled"
    assert embedded.get(f"/jobs/{jid}").status_code == 404


def test_deleting_a_cancelled_encode_job_removes_its_upload(embedded: TestClient, tmp_path: Path) -> None:
    uploads = embedded.app.state.storage.root / "uploads"
    blocker = embedded.post("/generate", json={"model": "big", "seed": 2, "format": "npy"}).json()["job_id"]
    r = embedded.post("/encode", data={"model": "tiny"}, files={"file": ("scan.nii.gz", nifti_upload(tmp_path))})
    jid = r.json()["job_id"]
    assert (uploads / jid).is_dir()  # waits behind the blocker, its upload on disk
    assert embedded.delete(f"/jobs/{jid}").json()["action"] == "cancelled"
    assert embedded.delete(f"/jobs/{jid}").json()["action"] == "deleted"
    assert not (uploads / jid).exists()
    embedded.delete(f"/jobs/{blocker}")
    _idle(embedded)
    assert embedded.get(f"/jobs/{jid}").status_code == 404


def test_bounded_schemathesis_run_finds_no_5xx_and_no_contract_failure(
    service_models_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("schemathesis")
    from benchmarks.contract import contract_failures, make_app, run_contract

    app = make_app(service_models_dir, tmp_path / "storage")
    try:
        res = run_contract(app, examples=25, seed=1)
    finally:
        app.state.jobs.close()
    assert sum(res["cases"].values()) > 500 and res["cases"]["coverage"] and res["cases"]["stateful"], res
    assert res["statuses"]["5xx"] == 0, res["samples"]
    assert contract_failures(res) == 0, (res["failures"], res["samples"], res["errors"])
