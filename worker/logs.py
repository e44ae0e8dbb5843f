"""Logs of the API and the workers: one line per record, as text or as JSON (VOXGEN_LOG_FORMAT=json),
each line carrying the id of the job it is about.

The job id comes from a context variable:

* a worker sets it around the job it runs (``job_context``: the Celery task, the embedded queue's
  thread), so every line logged while the job runs, by any module, carries it;
* the API opens a fresh log scope per HTTP request (``request_scope``, from a middleware): a request
  on ``/jobs/{id}...`` carries that id from its first line, and a submission binds the new job's id
  (``bind_job``) so the lines after it -- the submission line, uvicorn's access line -- carry it;
* Celery's own lines about a task ("Task voxgen.run_job[...] received/succeeded") carry it through
  the task id, which the sender sets to ``{job_id}.{attempt}`` (``task_id_for``).

JSON lines have ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, ``job_id`` (null when a
line is about no job), ``attempt`` where known, ``host``, ``pid``, and ``exc_info`` for exceptions.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_CTX: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("voxgen_log_context", default=None)
_TASK_ID = re.compile(r"^([0-9a-f]{32})\.(\d+)$")
_HANDLER_NAME = "voxgen"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [job %(job)s] %(message)s"


def task_id_for(job_id: str, attempt: int) -> str:
    """The Celery task id of one attempt of a job (so Celery's own log lines name the job)."""
    return f"{job_id}.{attempt}"


@contextmanager
def job_context(job_id: str, **fields: Any) -> Iterator[None]:
    """Every line logged inside (in this thread or task) carries ``job_id`` and ``fields``."""
    token = _CTX.set({"job_id": job_id, **fields})
    try:
        yield
    finally:
        _CTX.reset(token)


def request_scope() -> contextvars.Token:
    """A new, empty log scope (one per HTTP request); ``bind_job`` fills it.  Returns the token to
    ``end_scope`` with."""
    return _CTX.set({})


def end_scope(token: contextvars.Token) -> None:
    _CTX.reset(token)


def bind_job(job_id: str, **fields: Any) -> None:
    """Mark the current request scope as being about ``job_id`` (outside a scope: nothing).  The
    scope object is updated in place, so the request's later lines carry the id even where the
    binding happened in a copied context (FastAPI runs sync routes in a thread pool with a copy)."""
    ctx = _CTX.get()
    if ctx is not None and not ctx.get("job_id"):
        ctx.update(job_id=job_id, **fields)


def _context_of(record: logging.LogRecord) -> dict[str, Any]:
    """The job fields of a line: the context variable's, a ``job_id`` passed with ``extra=``, or
    those of Celery's task lines (``extra={'data': {'id': task id, ...}}``)."""
    ctx = dict(_CTX.get() or {})
    if getattr(record, "job_id", None):
        ctx["job_id"] = record.job_id  # type: ignore[attr-defined]
    data = getattr(record, "data", None)
    m = _TASK_ID.match(str(data.get("id", ""))) if isinstance(data, dict) else None
    if m and ctx.get("job_id") in (None, m.group(1)):
        ctx["job_id"], ctx["attempt"] = m.group(1), int(m.group(2))
    return ctx


class JobContextFilter(logging.Filter):
    """Adds ``job`` (the line's job id, or "-") to every record, for the text format."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.job = _context_of(record).get("job_id") or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring for the keys)."""

    def __init__(self) -> None:
        super().__init__()
        self.host = socket.gethostname()

    def format(self, record: logging.LogRecord) -> str:
        ctx = _context_of(record)
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "job_id": ctx.pop("job_id", None),
        }
        out.update({k: v for k, v in ctx.items() if k not in out})
        out["host"], out["pid"] = self.host, record.process or os.getpid()
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _Stderr(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is at the time of each line (test runners swap it),
    except Celery's proxy that turns stderr writes into log records (that would loop back here):
    then the process's real stderr."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> Any:
        s = sys.stderr
        if "celery" in sys.modules:
            from celery.utils.log import LoggingProxy

            if isinstance(s, LoggingProxy):
                return sys.__stderr__
        return s

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


def make_handler(fmt: str) -> logging.Handler:
    h = _Stderr()
    h.set_name(_HANDLER_NAME)
    h.addFilter(JobContextFilter())
    h.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    return h


def configure_logging(fmt: str = "text", level: str | int = "INFO", loggers: tuple[str, ...] = ()) -> None:
    """Send the root logger's lines to stderr in ``fmt`` ("json" or "text"), once per process
    (calling again replaces the handler).  ``loggers`` that bring their own handlers (uvicorn's,
    Celery's) are emptied and made to propagate to the root, so their lines get the same format."""
    if fmt not in ("json", "text"):
        raise ValueError(f"VOXGEN_LOG_FORMAT must be json or text, not {fmt!r}")
    root = logging.getLogger()
    for h in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(h)
    root.addHandler(make_handler(fmt))
    root.setLevel(level if isinstance(level, int) else level.upper())
    logging.captureWarnings(fmt == "json")  # a warning is a JSON line too, not raw text in between
    for name in loggers:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = True
