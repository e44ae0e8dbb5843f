"""Data-parallel training (model/distributed.py): two gloo ranks with half the batch each train as one
process with the whole batch, for HA-GAN (through ``torchrun ... voxgen train``) and StyleGAN (through
the worker's launcher); checkpoints resume with another number of ranks; the per-sample draws slice;
the Kubernetes training manifests validate.

Tolerances.  The ranks compute the same arithmetic on batches of one instead of two and sum the two
gradients after the backward pass instead of inside each kernel, so values agree to float32 rounding,
not bit for bit.  Measured: HA-GAN's first D gradient (Adam's ``exp_avg`` after one step, which is the
gradient itself with beta1 = 0) to 3e-6 relative (a wrong row, draw or scaling gives O(1)), the first
iteration's losses to 4e-5.  Adam's first steps then divide each gradient element by its own
magnitude, so an element whose gradient is near zero moves by +-lr on a rounding difference: the
weights after two iterations differ by up to ~3 lr in a few elements, and the difference between the
two runs' weights is 2.7% of the size of the last step's update (a different batch: about 140%).  The
test bounds that ratio at 10%.  StyleGAN's tiny network amplifies less: weights agree to 1e-5
absolute (lr 0.0025)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from model import distributed
from model.checkpoint import read_weights
from model.data.augment import RandomAugment, diff_augment
from tests.helpers import phantom_dataset

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys: list[str]) -> float:
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in keys)
    den = sum(float(a[k].double().norm() ** 2) for k in keys)
    return (num / max(den, 1e-300)) ** 0.5


# ------------------------------------------------------------------------------------ the pieces


def test_rows_split_the_batch_and_refuse_what_does_not_divide(monkeypatch: pytest.MonkeyPatch) -> None:
    assert distributed.part(3) == (0, 3)  # one process: the whole batch
    monkeypatch.setattr(distributed, "_CTX", distributed.Context(rank=1, world=2))
    assert distributed.part(4) == (2, 4)
    with pytest.raises(ValueError, match="batch 3 is not divisible by the 2 processes"):
        distributed.part(3)
    g = torch.Generator().manual_seed(0)
    whole = torch.randn(4, 3, generator=g)
    g.manual_seed(0)
    with distributed.rows(4, 2, 4):
        assert torch.equal(distributed.randn_rows(2, (3,), generator=g), whole[2:])


def test_augmentations_of_a_slice_are_the_whole_batchs_rows() -> None:
    """Every per-sample draw is made for the whole batch, so rows [lo, hi) transformed alone equal the
    same rows of the whole batch transformed, and the generator ends where it would."""
    x = torch.rand(4, 1, 16, 16, 16) * 2 - 1
    x[:, :, :2] = -1.0

    def run(fn, rows=None):  # noqa: ANN001, ANN202
        g = torch.Generator().manual_seed(5)
        y = fn(x if rows is None else x[rows[1] : rows[2]], g, rows)
        return y, torch.rand(1, generator=g)

    aug = RandomAugment()
    for fn in (
        lambda v, g, r: aug(v, g, rows=r),
        lambda v, g, r: diff_augment(v, g, rows=r),
        lambda v, g, r: diff_augment(v, g, axes=(3, 4), rows=r),
    ):
        whole, after = run(fn)
        for rows in ((4, 0, 2), (4, 2, 4), (4, 1, 2)):
            part, after_part = run(fn, rows)
            torch.testing.assert_close(part, whole[rows[1] : rows[2]], rtol=0, atol=1e-6)
            assert torch.equal(after_part, after)


def test_families_without_data_parallel_training_refuse_several_processes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from model.training import train

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="family 'alphawgan' trains in one process only"):
        train({"family": "alphawgan", "data": str(tmp_path), "output": str(tmp_path / "run")})


def test_the_train_request_takes_a_bounded_number_of_processes() -> None:
    from pydantic import ValidationError

    from service.schemas import TrainRequest

    base = {"data": "/datasets/d", "name": "m"}
    assert TrainRequest.model_validate(base).processes == 1
    assert TrainRequest.model_validate(base | {"processes": 4}).processes == 4
    for bad in (0, 17, "2", 1.5):
        with pytest.raises(ValidationError):
            TrainRequest.model_validate(base | {"processes": bad})


# ------------------------------------------------------------------------------------ HA-GAN


HAGAN = {"iterations": 2, "batch": 2, "width": 0.25, "latent_dim": 16, "device": "cpu", "seed": 3}
HAGAN |= {"recipe": "small-data", "monitor_every": 2, "monitor_n": 2, "checkpoint_every": 1, "preview_every": 2}


@pytest.mark.slow
def test_hagan_two_ranks_train_as_one_process_at_the_global_batch(brain_ds: Path, tmp_path: Path) -> None:
    """torchrun --standalone --nproc-per-node 2 voxgen train (gloo): every random draw of the small-data
    recipe (batch indices, latents, r, augmentation, DiffAugment) and the monitor on rank 0."""
    from model.hagan.train import Trainer

    cli = [f"--{k.replace('_', '-')}={v}" for k, v in HAGAN.items()]
    voxgen = str(Path(sys.executable).parent / "voxgen")
    two = tmp_path / "two"
    out = subprocess.run(
        [*TORCHRUN, voxgen, "train", "--data", str(brain_ds), "-o", str(two), *cli],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stderr.count("[2/2]") == 1  # rank 0 alone reports
    one = tmp_path / "one"
    Trainer(HAGAN | {"data": str(brain_ds), "output": str(one)}).fit()

    rows = {r: [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (one, two)}
    assert [x["iteration"] for x in rows[two]] == [1, 2]  # one writer
    assert "q_fd_texture" in rows[two][1] and (two / "best" / "best.json").is_file()
    assert sorted(p.name for p in (two / "previews").iterdir()) == ["iter_0000002.png"]
    for k, v in rows[one][0].items():
        if k != "time":
            assert rows[two][0][k] == pytest.approx(v, rel=1e-3), k
    ck = "checkpoints/iter_0000001"
    a, b = read_weights(one / ck, "train.safetensors"), read_weights(two / ck, "train.safetensors")
    d_grad = [k for k in a if k.startswith("optim.d.") and k.endswith(".exp_avg")]
    assert d_grad and _rel(a, b, d_grad) < 1e-4  # the first D gradient, on the same initial weights
    w1 = read_weights(one / ck)
    w2 = {r: read_weights(r / "checkpoints/iter_0000002") for r in (one, two)}
    keys = [k for k in w1 if w1[k].dtype.is_floating_point]
    diff = sum(float((w2[two][k].double() - w2[one][k].double()).norm() ** 2) for k in keys) ** 0.5
    step = sum(float((w2[one][k].double() - w1[k].double()).norm() ** 2) for k in keys) ** 0.5
    ratio = diff / step
    assert ratio < 0.1, f"the two runs' weights differ by {ratio:.3f} of the last step"

    # a checkpoint of two ranks loads in one process (no rank's state in it; the StyleGAN test below
    # continues such runs both ways)
    t = Trainer(HAGAN | {"data": str(brain_ds), "output": str(two), "iterations": 3, "resume": True})
    assert t.iteration == 2 and torch.equal(t.net.state_dict()["eg.out.weight"], w2[two]["eg.out.weight"])


# ------------------------------------------------------------------------------------ StyleGAN


@pytest.fixture(scope="module")
def ct_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four CT phantoms (40x48x48 voxels of 1.5 x 1 x 1 mm), prepared at 128^3."""
    return phantom_dataset(tmp_path_factory.mktemp("dist-sg"), "ct", (40, 48, 48), (1.5, 1.0, 1.0))


STYLEGAN = {"family": "stylegan3d", "shape": "8x16x16", "channels": 8, "latent_dim": 16, "mapping_width": 16}
# pl_batch_shrink 1: the path-length batch (2) splits over the two ranks as the single process has it
STYLEGAN |= {"batch": 2, "device": "cpu", "seed": 3, "checkpoint_every": 1, "preview_every": 2, "log_every": 1}
STYLEGAN |= {"pl_batch_shrink": 1}
# the small-data recipe: the augmentation and DiffAugment draws of the global batch on every rank, the
# monitor (at the last iteration of each run, and RUN/best) on rank 0
STYLEGAN |= {"recipe": "small-data", "monitor_every": 10, "monitor_n": 2}


def _close(a: Path, b: Path, files: tuple[str, ...], atol: float) -> None:
    for f in files:
        x, y = read_weights(a, f), read_weights(b, f)
        assert x.keys() == y.keys()
        for k in x:
            if x[k].dtype.is_floating_point:
                # atol for small values, and 8 float32 ulps (2^-23 each) relative for large ones: the mapping
                # network's weights are stored divided by its lr multiplier (0.01), so they reach ~130, where one
                # ulp is 1.5e-5 and an atol of 1e-5 would ask for less than one rounding step
                torch.testing.assert_close(
                    y[k], x[k], rtol=8 * 2**-23, atol=atol, msg=lambda m, k=k, f=f: f"{f} {k}: {m}"
                )
            else:
                assert torch.equal(x[k], y[k]), k


@pytest.mark.slow
def test_stylegan_two_ranks_train_as_one_process_and_resume_with_any_number(ct_ds: Path, tmp_path: Path) -> None:
    """Iteration 0 runs R1 and the path-length term (double backward through the gathered minibatch
    std); the worker's launcher (``processes`` > 1) relays rank 0's progress; a one-process
    checkpoint resumes on two ranks and a two-rank one in one process."""
    from model.stylegan3d.train import Trainer

    seen: list[tuple[int, int, str]] = []
    two = tmp_path / "two"
    model_dir = distributed.launch(
        STYLEGAN | {"data": str(ct_ds), "output": str(two), "iterations": 2},
        2,
        lambda d, t, s: seen.append((d, t, s)),
        poll_s=0.05,
    )
    assert model_dir == two / "model" and (model_dir / "config.json").is_file()
    assert seen[-1] == (2, 2, "train") and (two / "best" / "best.json").is_file()
    one = tmp_path / "one"
    Trainer(STYLEGAN | {"data": str(ct_ds), "output": str(one), "iterations": 2}).fit()
    files = ("model.safetensors", "train.safetensors")
    _close(one / "checkpoints/iter_0000002", two / "checkpoints/iter_0000002", files, 1e-5)

    # 1 -> 2 ranks and 2 -> 1 rank, each one more iteration, against the one-process run continued
    ref = tmp_path / "ref"
    Trainer(STYLEGAN | {"data": str(ct_ds), "output": str(ref), "iterations": 3}).fit()
    Trainer(STYLEGAN | {"data": str(ct_ds), "output": str(two), "iterations": 3, "resume": True}).fit()
    distributed.launch(STYLEGAN | {"data": str(ct_ds), "output": str(one), "iterations": 3, "resume": True}, 2)
    for run in (one, two):
        _close(ref / "checkpoints/iter_0000003", run / "checkpoints/iter_0000003", files, 1e-5)

    # a bad option fails every rank with its message, which the launcher raises
    with pytest.raises(ValueError, match="batch 3 is not divisible by the 2 processes"):
        distributed.launch(STYLEGAN | {"data": str(ct_ds), "output": str(tmp_path / "bad"), "batch": 3}, 2)


def test_the_launcher_refuses_what_every_rank_would_before_starting_any(tmp_path: Path) -> None:
    """A dataset that is not there, a one-process family, more CUDA ranks than GPUs: refused with the
    message a rank would give, and no rank started (no run folder, no torchrun log)."""
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="not a prepared dataset"):
        distributed.launch(STYLEGAN | {"data": str(tmp_path / "nothing"), "output": str(run)}, 16)
    with pytest.raises(ValueError, match="trains in one process only"):
        distributed.launch({"family": "alphawgan", "data": str(tmp_path), "output": str(run)}, 2)
    if torch.cuda.device_count() < 64:
        with pytest.raises(ValueError, match="64 processes on CUDA need 64 GPUs"):
            distributed.launch(STYLEGAN | {"output": str(run), "device": "cuda"}, 64)
    assert not run.exists()


# ------------------------------------------------------------------------------------ deploy


TRAINING = ROOT / "deploy" / "k8s" / "training"


def test_training_manifests_validate_and_run_torchrun_on_their_gpus() -> None:
    """The Job against the Kubernetes API schemas (strict); the PyTorchJob's pod template too (as a
    PodTemplate: kubernetes-validate has no schema for the training operator's CRD) beside the CRD's
    fields it uses."""
    kv = pytest.importorskip("kubernetes_validate")
    job = yaml.safe_load((TRAINING / "train-job.yaml").read_text())
    ptj = yaml.safe_load((TRAINING / "pytorchjob.yaml").read_text())
    specs = ptj["spec"]["pytorchReplicaSpecs"]
    pods = [("Job", job["spec"]["template"])] + [(f"PyTorchJob {r}", s["template"]) for r, s in specs.items()]
    pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
    for version in ("1.29.0", "1.37.0"):
        kv.validate(job, version, strict=True)
        for what, template in pods:
            try:
                kv.validate(pod_template | {"template": template}, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"{what} pod template against Kubernetes {version}: {e}")
    (c,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert int(env["GPUS"]) == c["resources"]["limits"]["nvidia.com/gpu"] > 1
    script = c["command"][2]
    assert "torch.distributed.run --standalone" in script and '--nproc-per-node="$GPUS"' in script
    assert "-m model.cli train" in script and "--device=cuda" in c["args"]
    # kubeflow.org/v1 PyTorchJob: the fields of its CRD used here; the container the operator finds
    assert ptj["apiVersion"] == "kubeflow.org/v1" and ptj["kind"] == "PyTorchJob"
    assert set(ptj["spec"]) <= {"nprocPerNode", "runPolicy", "pytorchReplicaSpecs", "elasticPolicy"}
    assert set(specs) == {"Master", "Worker"} and specs["Master"]["replicas"] == 1
    for s in specs.values():
        assert set(s) <= {"replicas", "restartPolicy", "template"}
        (c,) = s["template"]["spec"]["containers"]
        assert c["name"] == "pytorch" and "torch.distributed.run" in c["command"][2]
        assert int(ptj["spec"]["nprocPerNode"]) == c["resources"]["limits"]["nvidia.com/gpu"]
    # the CLI takes the arguments the manifests pass
    from model.cli import build_parser

    for args in (job["spec"]["template"]["spec"]["containers"][0]["args"], c["args"]):
        build_parser().parse_args(["train", "--output", "/data/run", *args, "--resume"])
