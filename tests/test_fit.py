"""Latent fitting after the amortised encoder (model/latent/fit.py): ``encode(x, steps=N)``,
``voxgen encode/reconstruct --steps`` and ``POST /encode`` ``steps``."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from model.alphawgan.config import AlphaWGANConfig
from model.alphawgan.model import AlphaWGANModel
from model.base import Intensity
from model.hagan.config import HAGANConfig
from model.hagan.model import HAGANModel
from model.latent import MAX_FIT_STEPS
from model.latent.fit import fit_latent
from tests.conftest import service_nifti_upload as nifti_upload
from tests.conftest import service_wait as wait


def _l1(decode, x: torch.Tensor, z: torch.Tensor) -> float:  # noqa: ANN001
    with torch.no_grad():
        return float((decode(z) - x).abs().mean())


def test_fit_moves_the_code_towards_the_volume_and_keeps_the_best() -> None:
    """A linear decoder: the fit lowers the L1 from the encoder's code towards the code that made the
    volume; a learning rate that only overshoots gives back the start (the best code seen, never a
    worse one); 0 steps change nothing; a step count out of range is refused."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 200, generator=g)
    decode = lambda z: z @ w  # noqa: E731
    z_true = torch.randn(2, 8, generator=g)
    x = decode(z_true)
    z0 = z_true + 0.5 * torch.randn(2, 8, generator=g)
    z = fit_latent(decode, x, z0, 200)
    before, after = _l1(decode, x, z0), _l1(decode, x, z)
    assert after < 0.2 * before, (before, after)
    assert float((z - z_true).abs().mean()) < float((z0 - z_true).abs().mean())
    # every step overshoots: the start is the best code seen
    assert torch.equal(fit_latent(decode, x, z0, 3, lr=1e6), z0)
    assert fit_latent(decode, x, z0, 0) is z0
    for bad in (-1, MAX_FIT_STEPS + 1, 1.5, True):
        with pytest.raises(ValueError, match="steps must be an integer"):
            fit_latent(decode, x, z0, bad)


def test_hagan_encode_with_steps_reconstructs_closer() -> None:
    """HA-GAN: ``encode(x, steps=N)`` starts from the hierarchical encoder's code and ends with a
    lower reconstruction error (through the served generator, as ``reconstruct`` makes it), reports
    its steps as progress, and leaves the weights alone; a class-conditional model's fit needs the
    label."""
    m = HAGANModel.init(HAGANConfig(resolution=128, width=0.25, latent_dim=16), seed=0)
    x = m.generate(torch.randn(1, 16, generator=torch.Generator().manual_seed(3)))
    before = {k: v.clone() for k, v in m.net.state_dict().items()}
    z0 = m.encode(x)
    seen: list[tuple[int, int, str]] = []
    z = m.encode(x, steps=8, progress=lambda d, t, s: seen.append((d, t, s)))
    err0 = float((m.generate(z0) - x).abs().mean())
    err = float((m.generate(z) - x).abs().mean())
    assert err < 0.95 * err0, (err0, err)
    assert seen[0] == (1, 1, "encode") and seen[-1] == (8, 8, "fit") and len(seen) == 9
    assert all(torch.equal(v, before[k]) for k, v in m.net.state_dict().items())
    assert torch.equal(m.encode(x, steps=0), z0)
    cond = HAGANModel.init(HAGANConfig(resolution=128, width=0.25, latent_dim=16, class_names=["a", "b"]), seed=0)
    with pytest.raises(ValueError, match="class-conditional"):
        cond.encode(x, steps=1)
    assert cond.encode(x, steps=1, label=1).shape == (1, 16)


def test_alphawgan_encode_with_steps_reconstructs_closer() -> None:
    m = AlphaWGANModel.init(
        AlphaWGANConfig(
            width=0.125, latent_dim=16, code_hidden=32, modality="ct", intensity=Intensity.for_modality("ct")
        )
    )
    x = m.generate(torch.randn(1, 16, generator=torch.Generator().manual_seed(1)))
    z0, z = m.encode(x), m.encode(x, steps=10)
    err0, err = (float((m.generate(v) - x).abs().mean()) for v in (z0, z))
    assert err < 0.95 * err0, (err0, err)


def test_the_service_fits_the_latent_when_asked(embedded: TestClient, tmp_path: Path) -> None:
    """POST /encode with ``steps``: the job fits the latent (its reconstruction closer to the upload
    than the encoder's alone; the latent differs); out of range: 422 before anything is queued; a
    class-conditional model fits with the label its request names."""
    data = nifti_upload(tmp_path)
    files = {"file": ("scan.nii.gz", data, "application/gzip")}
    zs = {}
    for steps in (None, 6):
        form = {"model": "tiny", "reconstruct": "true", "space": "model"} | ({} if steps is None else {"steps": steps})
        r = embedded.post("/encode", data=form, files=files)
        assert r.status_code == 202, r.text
        s = wait(embedded, r.json()["job_id"])
        assert s["state"] == "succeeded", s
        rec = embedded.get(f"/jobs/{s['job_id']}/files/reconstruction.nii.gz").content
        zs[steps] = (np.asarray(s["result"]["latent"]), rec)
    assert not np.allclose(zs[None][0], zs[6][0])
    from model.data.volumes import load_for_model
    from model.registry import from_pretrained

    up, a, b = tmp_path / "up.nii.gz", tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    up.write_bytes(data)
    a.write_bytes(zs[None][1])
    b.write_bytes(zs[6][1])
    cfg = from_pretrained(embedded.app.state.settings.models_dir / "tiny").config
    x = load_for_model(up, cfg)  # the upload in model space, as the job saw it
    # the reconstructions (written in the modality's units on the model's grid) back in model space
    err = [float(np.abs(load_for_model(p, cfg) - x).mean()) for p in (a, b)]
    assert err[1] < err[0], err
    for form, where in (
        ({"model": "tiny", "steps": "-1"}, "steps"),
        ({"model": "tiny", "steps": str(MAX_FIT_STEPS + 1)}, "steps"),
    ):
        r = embedded.post("/encode", data=form, files=files)
        assert r.status_code == 422, r.text
        assert where in str(r.json()["detail"]), r.text
    r = embedded.post("/encode", data={"model": "cond", "steps": "2", "label": "copd"}, files=files)
    assert r.status_code == 202, r.text
    assert wait(embedded, r.json()["job_id"])["state"] == "succeeded"
    z = np.load(io.BytesIO(embedded.get(f"/jobs/{r.json()['job_id']}/files/latent.npy").content))
    assert np.isfinite(z).all()


def test_a_projection_needs_a_step() -> None:
    from service.errors import Invalid
    from service.routes.encode import check_steps

    for family in ("hagan", "alphawgan"):
        check_steps({"family": family}, 0)  # the encoder alone
    for family in ("stylegan3d", "splitshuffle"):
        check_steps({"family": family}, 1)
        with pytest.raises(
            Invalid, match=f"steps must be 1 to 1000 for a {family} model \\(it encodes by projection\\)"
        ):
            check_steps({"family": family}, 0)


def test_cli_steps(tmp_path: Path) -> None:
    """``voxgen reconstruct --steps N``: closer to the scan than the encoder alone; out of range: a
    message, no file."""
    from tests.test_cli import voxgen

    d = tmp_path / "m"
    HAGANModel.init(HAGANConfig(resolution=128, width=0.25, latent_dim=16), seed=0).save_pretrained(d)
    scan = tmp_path / "scan.nii.gz"
    voxgen("generate", "--model", str(d), "--seed", "4", "-o", str(scan))
    for steps in ("0", "5"):
        voxgen("reconstruct", "--model", str(d), str(scan), "--steps", steps, "-o", str(tmp_path / f"r{steps}.npy"))
    from model.data.volumes import load_for_model
    from model.registry import from_pretrained

    x = load_for_model(scan, from_pretrained(d).config)
    err = [float(np.abs(np.load(tmp_path / f"r{s}.npy") - x).mean()) for s in ("0", "5")]
    assert err[1] < err[0], err
    # a class-conditional model: the encoder alone needs no class, a fit generates one and needs --label
    c = tmp_path / "c"
    HAGANModel.init(
        HAGANConfig(resolution=128, width=0.25, latent_dim=16, class_names=["a", "b"]), seed=0
    ).save_pretrained(c)
    voxgen("encode", "--model", str(c), str(scan), "-o", str(tmp_path / "zc.npy"))
    p = voxgen("encode", "--model", str(c), str(scan), "--steps", "1", "-o", str(tmp_path / "zc1.npy"), check=False)
    assert p.returncode != 0 and "class-conditional: pass a label" in p.stderr and "Traceback" not in p.stderr
    voxgen("encode", "--model", str(c), str(scan), "--steps", "1", "--label", "b", "-o", str(tmp_path / "zc1.npy"))
    p = voxgen("encode", "--model", str(d), str(scan), "--steps", "-2", "-o", str(tmp_path / "z.npy"), check=False)
    assert p.returncode != 0 and "--steps must be 0 to 1000 for a hagan model" in p.stderr
    assert not (tmp_path / "z.npy").exists()


def test_a_model_directory_sets_the_default_steps(tmp_path: Path) -> None:
    """``encode_steps`` in an HA-GAN config.json: what ``encode`` fits when the caller gives no
    ``steps`` (0 still means the encoder alone); written only where it is not 0, so older files stay
    byte for byte; out of range refused."""
    cfg = HAGANConfig(resolution=128, width=0.25, latent_dim=16)
    assert "encode_steps" not in cfg.to_dict()
    m = HAGANModel.init(HAGANConfig(resolution=128, width=0.25, latent_dim=16, encode_steps=3), seed=0)
    m.save_pretrained(tmp_path / "m")
    from model.registry import from_pretrained

    m2 = from_pretrained(tmp_path / "m")
    assert m2.config.encode_steps == 3 and m2.config.to_dict()["encode_steps"] == 3
    x = m2.generate(torch.randn(1, 16, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(m2.encode(x), m2.encode(x, steps=3))
    assert not torch.equal(m2.encode(x), m2.encode(x, steps=0))
    for bad in (-1, MAX_FIT_STEPS + 1, 2.5, True):
        with pytest.raises(ValueError, match="encode_steps must be an integer"):
            HAGANConfig(resolution=128, width=0.25, latent_dim=16, encode_steps=bad)
