"""Data-parallel training on PyTorch's distributed engine, shared by the HA-GAN and StyleGAN trainers.

Launch: ``torchrun --standalone --nproc-per-node N $(which voxgen) train ...`` (one machine) or
``torchrun --nnodes M --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint HOST:PORT ...`` (several).
``init(device)`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``) and joins the process group: NCCL on CUDA (each rank on
``cuda:LOCAL_RANK``), gloo on the CPU.  ``WORLD_SIZE`` absent or 1 is a plain single process: nothing
here changes a value then (every helper is the identity), so single-process training stays bit for bit.

The semantics are DistributedDataParallel's: every rank holds the same weights and optimizer state,
computes the losses of its own slice of the global batch, and the gradients are averaged over the ranks
(``average_gradients``: all_reduce of flattened buckets, divided by the world size, which is what DDP's
reducer does) right before each optimizer step, so each step equals one step on the global batch.  The
trainers average by hand instead of wrapping each network in ``DistributedDataParallel``: HA-GAN takes four
optimizer steps per iteration on overlapping sub-networks with ``requires_grad`` toggled between them, and
StyleGAN's lazy R1 and path-length terms differentiate twice (``autograd.grad(create_graph=True)``), which
DDP's reducer does not support; StyleGAN2-ADA's own multi-GPU loop averages the same way.

Equivalence with one process at the global batch needs every random draw to be the same: each rank draws
the *global* batch's indices, latents, crop start, augmentation and noise from the same seeds and keeps its
rows (``part``, ``rows``, ``randn_rows``), so each rank reads only its slice's volumes (its shard of the
data) and the random streams stay in step on every rank, and a checkpoint (written by rank 0) is
rank-independent: it resumes with any number of ranks.  Losses are per-sample means, so with equal slices
the mean of the ranks' losses is the global batch's; the global batch must be divisible by the world size.
Operations that mix samples use the whole batch: StyleGAN's minibatch standard deviation gathers the
batch (``gather_rows``, differentiable, twice as well) and its running means (``w_avg``, the path-length
mean) take the global mean (``mean_over_ranks``).  GroupNorm is per sample: nothing to synchronise.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

BUCKET_BYTES = 25 << 20  # gradients are all-reduced in flattened buckets of about this size, as DDP's
TIMEOUT = datetime.timedelta(hours=1)  # rank 0 alone writes checkpoints, previews and the monitor meanwhile
ERROR_MARK = "voxgen train error: "  # how a rank reports a bad option or dataset to ``launch``


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


_CTX = Context()
# (global rows, first row, end) of the batch being computed: draws of per-sample random numbers take the
# global batch's and keep these rows; None: the whole batch is local
_ROWS: contextvars.ContextVar[tuple[int, int, int] | None] = contextvars.ContextVar("voxgen_rows", default=None)


def context() -> Context:
    """This process's rank, world size and local rank (0, 1, 0 outside a distributed run)."""
    return _CTX


def is_main() -> bool:
    return _CTX.rank == 0


def env_world_size() -> int:
    """WORLD_SIZE from torchrun's environment (1 when absent)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def wants_cuda(device: str | None) -> bool:
    """Whether a training ``device`` option puts the ranks on CUDA: "cuda..." or auto with CUDA present."""
    return (device or "auto").startswith("cuda") or (device in (None, "", "auto") and torch.cuda.is_available())


def refuse_one_process_family(family: str) -> None:
    """ValueError for a family whose trainer runs in one process only (model/families.py)."""
    from model import families

    if family not in families.multi_process():
        raise ValueError(
            f"family {family!r} trains in one process only; torchrun with several processes trains "
            f"{', '.join(families.multi_process())}"
        )


def init(device: str | None) -> tuple[Context, str | None]:
    """Join the process group torchrun describes in the environment; returns the context and the
    device this rank trains on (``cuda:LOCAL_RANK`` when ``device`` is CUDA or auto with CUDA present;
    the option as given elsewhere).  A world of one initialises nothing."""
    global _CTX
    world = env_world_size()
    if world <= 1:
        return _CTX, device
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = wants_cuda(device)
    if cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available on this machine")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    elif device in (None, "", "auto"):
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    _CTX = Context(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local)
    return _CTX, device


def shutdown(barrier: bool = True) -> None:
    """Leave the process group, after a last barrier (no rank exits while rank 0 still writes) unless
    ``barrier`` is False (a rank that failed leaves at once: torchrun then stops the others)."""
    global _CTX
    if _CTX.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            if barrier:
                dist.barrier()
            dist.destroy_process_group()
    _CTX = Context()


@contextlib.contextmanager
def session(device: str | None) -> Iterator[tuple[Context, str | None]]:
    """``init`` ... ``shutdown`` around a training run."""
    ctx, dev = init(device)
    try:
        yield ctx, dev
    except BaseException:
        shutdown(barrier=False)
        raise
    shutdown()


def part(global_n: int, what: str = "batch") -> tuple[int, int]:
    """This rank's rows [lo, hi) of a global batch of ``global_n``: equal slices, in rank order.  A
    batch not divisible by the world size is refused (ValueError)."""
    w = _CTX.world
    if global_n % w:
        raise ValueError(f"{what} {global_n} is not divisible by the {w} processes (WORLD_SIZE): use a multiple of {w}")
    k = global_n // w
    return _CTX.rank * k, (_CTX.rank + 1) * k


@contextlib.contextmanager
def rows(global_n: int, lo: int, hi: int) -> Iterator[None]:
    """Inside: the batch computed holds rows [lo, hi) of ``global_n`` (``randn_rows``, ``gather_rows``).
    A whole batch (lo 0, hi global_n) sets nothing, so single-process code runs as it always has."""
    if lo == 0 and hi == global_n:
        yield
        return
    token = _ROWS.set((global_n, lo, hi))
    try:
        yield
    finally:
        _ROWS.reset(token)


def randn_rows(n: int, rest: tuple[int, ...], **kw: Any) -> torch.Tensor:
    """``torch.randn(n, *rest, **kw)`` for a batch of ``n`` local rows: inside ``rows`` the global batch's
    numbers are drawn and this rank's rows kept, so every rank's random stream moves alike."""
    r = _ROWS.get()
    if r is None or r[2] - r[1] != n:
        return torch.randn(n, *rest, **kw)
    g, lo, hi = r
    return torch.randn(g, *rest, **kw)[lo:hi]


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks; its adjoint is the same sum (so it differentiates any number of times)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        y = x.clone().contiguous()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _AllReduceSum.apply(g)


class _GatherRows(torch.autograd.Function):
    """Every rank's rows concatenated in rank order; the gradient of a rank's rows is the sum of every
    rank's gradient for them (the adjoint of the copy), through ``_AllReduceSum``: differentiable again,
    which StyleGAN's R1 term (a gradient penalty, differentiated twice) needs."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        ctx.lo, ctx.hi = lo, hi
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return _AllReduceSum.apply(g)[ctx.lo : ctx.hi], None, None


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Inside ``rows`` (equal slices): the global batch (differentiable) and this rank's [lo, hi) in it;
    elsewhere ``x`` itself, 0, len(x)."""
    r = _ROWS.get()
    if r is None or _CTX.world == 1 or r[2] - r[1] != x.shape[0]:
        return x, 0, x.shape[0]
    _, lo, hi = r
    return _GatherRows.apply(x, lo, hi), lo, hi


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The mean over the ranks of a (detached) tensor: with equal slices, a per-rank batch mean becomes
    the global batch's mean.  The identity in a single process."""
    if _CTX.world == 1:
        return x
    import torch.distributed as dist

    y = x.detach().clone().contiguous()
    dist.all_reduce(y)
    return y / _CTX.world


def _buckets(tensors: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if bucket and (size + t.numel() * t.element_size() > BUCKET_BYTES or t.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel() * t.element_size()
    if bucket:
        yield bucket


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over the ranks in place, as DDP's reducer does: the gradients
    present (every rank runs the same code, so the same ones are present everywhere) are flattened into
    buckets, each all-reduced once and divided by the world size.  Nothing in a single process."""
    if _CTX.world == 1:
        return
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    for bucket in _buckets(grads):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat /= _CTX.world
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def average_scalars(values: dict[str, float]) -> dict[str, float]:
    """Per-rank losses -> their mean over the ranks (the global batch's loss), for the metrics."""
    if _CTX.world == 1 or not values:
        return values
    import torch.distributed as dist

    keys = list(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return {k: float(v) / _CTX.world for k, v in zip(keys, t.tolist(), strict=True)}


def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers to every rank (as DDP does when it wraps a module); the seeds make
    them equal already, this guards against any difference in the ranks' start."""
    if _CTX.world == 1:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, 0)


def progress_file_writer(path: str | os.PathLike) -> Any:
    """A progress callback that writes ``{"done", "total", "stage"}`` atomically to ``path`` (how a
    worker follows a training run it started under torchrun)."""
    p = Path(path)

    def write(done: int, total: int, stage: str) -> None:
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps({"done": done, "total": total, "stage": stage}))
        os.replace(tmp, p)

    return write


def check_launch(options: dict[str, Any], processes: int) -> None:
    """What ``launch`` refuses before it starts any rank (ValueError): a family that trains in one
    process only, a dataset that is not there, more CUDA ranks than GPUs.  Each rank would find the same
    after importing torch; ``processes`` of them doing so first cost seconds each on a small CPU."""
    from model.data.datasets import VolumeDataset

    refuse_one_process_family(options.get("family") or "hagan")
    if options.get("data") is not None:
        VolumeDataset(options["data"])  # its own message for a folder that is not a prepared dataset
    if wants_cuda(options.get("device")) and processes > torch.cuda.device_count():
        raise ValueError(
            f"{processes} processes on CUDA need {processes} GPUs; this machine has {torch.cuda.device_count()}"
        )


def launch(options: dict[str, Any], processes: int, progress: Any = None, poll_s: float = 0.5) -> Path:
    """Train ``options`` in ``processes`` ranks on this machine: ``python -m torch.distributed.run
    --standalone --nproc-per-node N -m model.distributed OPTIONS.json`` as a subprocess (what the
    worker's ``train`` job does for ``processes`` > 1).  Rank 0's progress is relayed to ``progress``;
    if that raises (a cancelled job), the ranks are stopped and the exception goes on.  The ranks'
    output goes to ``RUN/torchrun.log``; a failed run raises ValueError with its error line.  On the
    CPU the threads of this process are shared among the ranks.  Returns ``RUN/model``."""
    import signal
    import subprocess
    import time

    check_launch(options, processes)
    run = Path(options["output"])
    run.mkdir(parents=True, exist_ok=True)
    opts_file, prog_file, log_file = run / "torchrun-options.json", run / ".progress.json", run / "torchrun.log"
    opts_file.write_text(json.dumps(options, default=str))
    prog_file.unlink(missing_ok=True)
    env = dict(os.environ, VOXGEN_PROGRESS_FILE=str(prog_file))
    env["OMP_NUM_THREADS"] = str(max(1, torch.get_num_threads() // processes))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # a fresh group, whatever this process runs in
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={int(processes)}"]
    cmd += ["-m", "model.distributed", str(opts_file)]
    seen = ""
    with open(log_file, "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            while True:
                done = proc.poll() is not None
                if progress is not None and prog_file.is_file():
                    text = prog_file.read_text()
                    if text and text != seen:
                        seen = text
                        p = json.loads(text)
                        progress(int(p["done"]), int(p["total"]), str(p["stage"]))
                if done:
                    break
                time.sleep(poll_s)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise
    if proc.returncode != 0:
        lines = log_file.read_text(errors="replace").splitlines()
        errors = [ln.split(ERROR_MARK, 1)[1] for ln in lines if ERROR_MARK in ln]
        if errors:
            raise ValueError(errors[-1])
        tail = "\n".join(lines[-20:])
        raise RuntimeError(f"distributed training failed (exit status {proc.returncode}):\n{tail}")
    return run / "model"


def main(argv: list[str] | None = None) -> int:
    """``python -m model.distributed OPTIONS.json``: train with the options in the file (what the worker's
    ``train`` job starts under torch.distributed.run for ``processes`` > 1).  ``VOXGEN_PROGRESS_FILE``
    names the file rank 0 writes its progress to."""
    from model.training import train

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m model.distributed OPTIONS.json\n")
        return 2
    try:
        out = train(json.loads(Path(args[0]).read_text()))
    except ValueError as e:  # a bad option or dataset: the message, as the CLI gives it
        sys.stderr.write(f"{ERROR_MARK}{e}\n")
        return 2
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
