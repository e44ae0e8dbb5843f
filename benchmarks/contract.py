"""The API against its own OpenAPI document: a bounded schemathesis run on the in-process app.

The app runs on the embedded queue with tiny models made as tests/conftest.py makes them (a 128^3
HA-GAN at width 0.25 with a named direction, and a class-conditional one) and an admin token,
which every request carries (schemathesis's ``ignored_auth`` check then also sends each accepted
admin request without it and with a wrong one, and expects 401/403).  schemathesis's engine runs
its phases -- coverage (boundary values, missing and wrong-typed fields, undeclared HTTP methods),
fuzzing (``--examples`` draws per operation, schema-valid and schema-violating requests), and
stateful sequences that follow the links it infers between operations (POST /generate -> GET or
DELETE /jobs/{job_id} ...) -- from a fixed seed, deterministically, so a run is reproducible.

Printed: the cases sent per phase, the answers by status class, and the failures of each check
(a case counts once per check it fails).  The contract -- the run exits non-zero if any is above 0:

  5xx answers                   (also not_a_server_error)
  status_code_conformance       a status the operation's OpenAPI responses do not list
  content_type_conformance      a media type the listed response does not declare
  response_headers_conformance  a declared response header missing or malformed
  response_schema_conformance   a body that does not match the listed response's schema
  unsupported_method            an undeclared method not answered 405 with an Allow header
  any other check schemathesis runs by default (ignored_auth, use_after_free, ...)

Reported, not part of the contract:

* ``positive_data_acceptance``: a schema-valid request refused with a 4xx other than 401/403/404.
  The service refuses some schema-valid requests on purpose, because what is valid depends on the
  served models and the settings, which a static schema cannot state: a label for a model without
  classes, n above VOXGEN_MAX_N, a latent of the wrong length, a direction the model does not
  have, an upload that is no readable volume.  (And schemathesis 4.32 sends 9223372036854775999
  as a "valid" seed, where the schema's maximum is 2^63 - 1: it computes that bound in floating
  point.  The service refuses it, rightly.)
* ``use_after_free`` where the later read shows the job ``cancelled``: DELETE of a queued or
  running job cancels it and keeps its record (state ``cancelled``) until the TTL, so a client
  sees what happened; only a finished job's DELETE removes it.  Any other use_after_free counts.

    python benchmarks/contract.py [--examples 1400] [--seed 1] [--show 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

KEPT_CANCELLED = "use_after_free (a cancelled job's record, kept on purpose)"
REPORTED_CHECKS = ("positive_data_acceptance", KEPT_CANCELLED)
TOKEN = "contract-token"


def make_models(d: Path, latent: int = 16) -> Path:
    """tiny (128^3 CT, width 0.25, one direction "soft") and cond (classes healthy, copd)."""
    import torch

    from model.hagan.config import HAGANConfig
    from model.hagan.model import HAGANModel
    from model.latent.directions import Direction, save_direction

    HAGANModel.init(HAGANConfig(resolution=128, width=0.25, latent_dim=latent), seed=0).save_pretrained(d / "tiny")
    HAGANModel.init(
        HAGANConfig(resolution=128, width=0.25, latent_dim=latent, class_names=["healthy", "copd"]), seed=1
    ).save_pretrained(d / "cond")
    save_direction(d / "tiny", Direction("soft", "soft_tissue_ml", torch.linspace(-1, 1, latent), 5.0, 0.9, None, 64))
    return d


def make_app(models_dir: Path, storage_dir: Path) -> Any:
    """The service on the embedded queue, as `voxgen serve` builds it."""
    from service.app import create_app
    from service.settings import Settings

    s = Settings(
        models_dir=models_dir,
        storage_dir=storage_dir,
        redis_url=None,
        admin_token=TOKEN,
        max_upload_mb=1,
        max_n=2,  # the jobs that accepted requests queue stay small
        threads=1,  # and leave a CPU to the requests
    )
    return create_app(s)


def run_contract(app: Any, examples: int, seed: int = 1) -> dict[str, Any]:
    """One schemathesis run over every operation of ``app``'s OpenAPI document."""
    import schemathesis
    from schemathesis.engine import events, from_schema

    from service.waits import WAIT_MAX_SECONDS

    config = schemathesis.Config.from_dict(
        {
            "seed": seed,
            # a long poll (GET /jobs/{id}?wait=S) may rightly take up to WAIT_MAX_SECONDS while the queue
            # works through the jobs the run submitted; schemathesis's default 10 s read timeout turned
            # that into an engine error on a loaded machine
            "request-timeout": WAIT_MAX_SECONDS + 30,
            "cache": {"enabled": False},  # no replay of an earlier run's findings: each run stands alone
            "continue-on-failure": True,
            "generation": {"max-examples": examples, "mode": "all", "deterministic": True, "no-shrink": True},
            "headers": {"Authorization": f"Bearer {TOKEN}"},
        }
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    cases: Counter = Counter()
    statuses: Counter = Counter()
    failures: Counter = Counter()
    samples: dict[str, list[str]] = {}
    reasons: Counter = Counter()  # (reported check, operation, the refusal's first message)
    errors: list[str] = []
    for ev in from_schema(schema).execute():
        if isinstance(ev, events.ScenarioFinished):
            rec = ev.recorder
            cases[ev.phase.value] += len(rec.cases)
            for interaction in rec.interactions.values():
                if interaction.response is not None:
                    statuses[f"{interaction.response.status_code // 100}xx"] += 1
            for case_id, nodes in rec.checks.items():
                for node in nodes:
                    if node.failure_info is None:
                        continue
                    f = node.failure_info.failure
                    resp = rec.interactions.get(case_id)
                    answer, name, content = "-", node.name, b""
                    if resp is not None and resp.response is not None:
                        content = resp.response.content
                        answer = f"{resp.response.status_code} {content[:160].decode('utf-8', 'replace')}"
                        if name == "use_after_free" and _state(content) == "cancelled":
                            name = KEPT_CANCELLED
                    failures[name] += 1
                    if name in REPORTED_CHECKS:
                        reasons[(name, rec.label if ev.phase.value != "stateful" else "stateful", _why(content))] += 1
                    msg = f"{rec.label} [{ev.phase.value}]: {f.title} -> {answer}"
                    bucket = samples.setdefault(name, [])
                    if len(bucket) < 20 and msg not in bucket:
                        bucket.append(msg[:300])
        elif isinstance(ev, (events.NonFatalError, events.FatalError)):
            errors.append(str(getattr(ev, "info", None) or getattr(ev, "exception", ev))[:300])
    return {
        "cases": cases,
        "statuses": statuses,
        "failures": failures,
        "samples": samples,
        "reasons": reasons,
        "errors": errors,
    }


def _state(content: bytes) -> Any:
    try:
        body = json.loads(content)
    except ValueError:
        return None
    return body.get("state") if isinstance(body, dict) else None


def _why(content: bytes) -> str:
    """The first problem an error body names (its first 422 item's message), shortened."""
    try:
        body = json.loads(content)
    except ValueError:
        return "-"
    if not isinstance(body, dict):
        return "-"
    items = body.get("errors") or []
    msg = items[0].get("msg") if items and isinstance(items[0], dict) else body.get("detail") or body.get("state")
    return str(msg)[:90]


def contract_failures(res: dict[str, Any]) -> int:
    """5xx answers plus every failed check that is part of the contract, plus engine errors."""
    bad = res["statuses"]["5xx"] + len(res["errors"])
    return bad + sum(n for k, n in res["failures"].items() if k not in REPORTED_CHECKS and k != "not_a_server_error")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=1400, help="fuzzing draws per operation (max-examples)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--show", type=int, default=3, help="example failures shown per check")
    a = ap.parse_args()
    logging.disable(logging.WARNING)  # the app logs every refused request; the counts are the output
    import schemathesis

    with tempfile.TemporaryDirectory(prefix="voxgen-contract-") as d:
        app = make_app(make_models(Path(d) / "models"), Path(d) / "storage")
        t = time.time()
        res = run_contract(app, a.examples, a.seed)
        elapsed = time.time() - t
        app.state.jobs.close()
    print(f"schemathesis {schemathesis.__version__}, --examples {a.examples}, --seed {a.seed}: {elapsed:.0f} s")
    print(f"cases: {sum(res['cases'].values())} (" + ", ".join(f"{k} {v}" for k, v in res["cases"].items()) + ")")
    print("answers: " + ", ".join(f"{k} {v}" for k, v in sorted(res["statuses"].items())))
    print("| check | failed cases |")
    print("|---|---|")
    print(f"| 5xx answers | {res['statuses']['5xx']} |")
    for check, n in sorted(res["failures"].items()):
        print(f"| {check}{' (reported, not contract)' if check in REPORTED_CHECKS else ''} | {n} |")
    print(f"contract failures: {contract_failures(res)}")
    if res["reasons"]:
        print("reported, by operation and the answer's first message:")
        for (check, label, why), n in sorted(res["reasons"].items(), key=lambda kv: -kv[1]):
            print(f"  {n:5d}  {check}  {label}: {why}")
    for e in res["errors"]:
        print(f"  engine error: {e}")
    for check, msgs in res["samples"].items():
        for m in msgs[: a.show]:
            print(f"  {check}: {m}")
    raise SystemExit(1 if contract_failures(res) else 0)


if __name__ == "__main__":
    main()
