"""`voxgen evaluate` end to end on tiny models and a tiny prepared dataset: the report (JSON and
Markdown), the embedding plot and the montages; and a model that replays the real set scores at
the real-vs-real floor while an untrained network does not."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from model.alphawgan.config import AlphaWGANConfig
from model.alphawgan.model import AlphaWGANModel
from model.cli import main
from model.data.datasets import VolumeDataset
from model.data.phantoms import write_phantom
from model.hagan.config import HAGANConfig
from model.hagan.model import HAGANModel
from model.metrics.evaluate import evaluate
from tests.helpers import phantom_dataset

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    phantom_dataset(root, "ct", (40, 40, 40), n=6)
    HAGANModel.init(HAGANConfig(resolution=128, width=0.25, latent_dim=16), seed=0).save_pretrained(root / "hagan")
    AlphaWGANModel.init(AlphaWGANConfig(width=1 / 16, latent_dim=16, code_hidden=32), seed=0).save_pretrained(
        root / "alpha"
    )
    return {"root": root, "ds": root / "ds", "hagan": root / "hagan", "alpha": root / "alpha"}


def _finite(x: Any) -> bool:
    return isinstance(x, float) and np.isfinite(x)


def test_voxgen_evaluate_writes_report_and_plots(setup: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    out = setup["root"] / "report"
    args = ["evaluate", "--model", str(setup["hagan"]), "--real", str(setup["ds"]), "--n", "4", "--seed", "7"]
    args += ["--batch", "2", "--grid", "64", "--reference", str(setup["hagan"]), "--device", "cpu", "-o", str(out)]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_generated"] == 4 and summary["headline"]["name"] == "fd_texture"
    r = json.loads((out / "report.json").read_text())
    assert r["model"]["family"] == "hagan" and r["model"]["output_shape"] == [128, 128, 128]
    assert r["generated"]["n"] == 4 and r["generated"]["seed"] == 7 and r["real"]["n"] == 6
    assert r["grid"] == [64, 64, 64] and r["real"]["resampled_to"] == [64, 64, 64]
    # the contract of report.json
    assert set(r["headline"]) >= {"name", "value"} and _finite(r["headline"]["value"])
    assert set(r["floor"]) >= {"mean", "sd", "n"} and r["floor"]["n"] == 3  # 6 real volumes: 3 vs 3
    assert set(r["diversity"]) >= {"ms_ssim_generated", "ms_ssim_real"} and isinstance(r["warnings"], list)
    assert {"texture", "pooled8", "encoder-hagan", "slice-pooled16-axial"} <= set(r["distances"])
    for k, v in r["distances"].items():
        assert _finite(v["fd"]) and v["fd"] >= 0 and _finite(v["kid"]) and _finite(v["kid_sd"]), k
        assert _finite(v["floor"]["fd"]["mean"]) and _finite(v["floor"]["kid"]["sd"]), k
    assert r["headline"]["value"] == r["distances"]["texture"]["fd"]
    assert r["floor"]["mean"] == r["distances"]["texture"]["floor"]["fd"]["mean"]
    # fewer real volumes than 2n, and the judged model as its own reference: both said
    assert any("6 volumes" in w for w in r["warnings"]) and any("model being judged" in w for w in r["warnings"])
    mt = r["metrics"]
    planes = ("axial", "coronal", "sagittal")
    assert mt["slicewise"]["average"]["fd"] == pytest.approx(np.mean([mt["slicewise"][p]["fd"] for p in planes]))
    assert mt["bmmd2"]["n"] == 2 and mt["bmmd2"]["batch_size"] == 2 and mt["bmmd2"]["mean"] > 0
    assert 0 <= r["diversity"]["ms_ssim_generated"] <= 1 and r["diversity"]["pairs_generated"] == 2
    assert 0 <= r["diversity"]["ms_ssim_real"] <= 1 and r["diversity"]["pairs_real"] == 3
    rc = mt["reconstruction"]
    assert rc["n"] == 6 and rc["mae"] > 0 and rc["mae_constant"] > 0 and rc["encode_steps"] == 0
    # --encode-steps: the same figure with each latent fitted after the encoder, lower
    fitted = setup["root"] / "report-fitted"
    assert main([*args[:-1], str(fitted), "--encode-steps", "3"]) == 0
    capsys.readouterr()
    rc2 = json.loads((fitted / "report.json").read_text())["metrics"]["reconstruction"]
    assert rc2["encode_steps"] == 3 and rc2["mae"] < rc["mae"] and rc2["mae_constant"] == rc["mae_constant"]
    assert "each latent fitted by 3 steps" in (fitted / "report.md").read_text()
    # an untrained network is far from the real set: above the real-vs-real floor
    assert r["headline"]["value"] > r["floor"]["mean"] + 2 * r["floor"]["sd"]

    md = (out / "report.md").read_text()
    assert "Headline: fd_texture" in md and "| encoder-hagan |" in md and "| average |" in md
    assert "n = 6 of 6" in md and "## Warnings" in md
    emb = np.asarray(Image.open(out / "embedding.png").convert("RGB"))
    red = ((emb[..., 0] > 180) & (emb[..., 1] < 80) & (emb[..., 2] < 80)).sum()
    blue = ((emb[..., 2] > 150) & (emb[..., 0] < 80)).sum()
    assert red > 50 and blue > 50  # both groups and their ellipses are drawn
    mont = Image.open(out / "montage_generated.png")
    assert mont.size[0] > 3 * 64 and mont.size[1] >= 4 * 64  # 4 rows of axial | coronal | sagittal
    assert (out / "montage_real.png").is_file()
    with np.load(out / "features.npz", allow_pickle=False) as z:  # the features behind the plot
        assert z["real/encoder-hagan"].shape == (6, 16) and z["generated/pooled8"].shape == (4, 512)
        assert z["real/texture"].shape == (6, 52)


class _Replay:
    """A stand-in 'model' that generates the real dataset's own volumes (the best possible model)."""

    family = "replay"
    latent_dim = 1
    modality = "ct"
    device = torch.device("cpu")

    def __init__(self, ds: Path) -> None:
        d = VolumeDataset(ds)
        self.vols = torch.from_numpy(np.stack([np.asarray(d.volume(i), np.float32) for i in range(len(d))]))[:, None]
        self.output_shape = tuple(self.vols.shape[2:])
        self.config = None

    def sample_latents(self, n: int, seed: int) -> torch.Tensor:
        return torch.arange(n, dtype=torch.float32)[:, None] % len(self.vols)

    def generate(self, z: torch.Tensor, label: Any = None, **kw: Any) -> torch.Tensor:
        return self.vols[z[:, 0].long()]


def test_replaying_the_real_set_scores_at_the_floor_and_beats_an_untrained_model(setup: dict[str, Path]) -> None:
    kw = {"n": 6, "batch": 2, "grid": (32, 32, 32), "seed": 1}
    best = evaluate(_Replay(setup["ds"]), setup["ds"], **kw)
    untrained = evaluate(setup["alpha"], setup["ds"], **kw, device="cpu")
    for k in ("texture", "pooled8"):  # the real set itself, scored 3 vs 3: at its floor
        d = best["distances"][k]
        assert d["fd"] <= d["floor"]["fd"]["mean"] + 2 * d["floor"]["fd"]["sd"], k
        assert untrained["distances"][k]["fd"] > d["fd"], k
    assert untrained["headline"]["value"] > 5 * best["headline"]["value"]
    assert best["metrics"]["bmmd2"]["mean"] < untrained["metrics"]["bmmd2"]["mean"]
    assert untrained["metrics"]["reconstruction"]["n"] == 6  # alpha-WGAN-GP: its encoder reconstructs
    again = evaluate(setup["alpha"], setup["ds"], **kw, device="cpu")  # same seed, same numbers
    assert again["distances"] == untrained["distances"] and again["diversity"] == untrained["diversity"]


def _population(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """Brain-like test volumes [n, 1, size^3] in model space: an ellipsoid of jittered size and
    position on a -1 background, filled with a folded pattern (period about 5 voxels, warped by a
    smooth random field: every volume's folds differ) plus noise, so they have texture to lose."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.linspace(-1, 1, size)
    z, y, x = torch.meshgrid(lin, lin, lin, indexing="ij")
    f = np.pi * size / 5
    out = []
    for _ in range(n):
        r = 0.75 + 0.1 * torch.rand(3, generator=g)
        c = 0.05 * (torch.rand(3, generator=g) - 0.5)
        mask = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 < 1
        warp = torch.nn.functional.interpolate(
            torch.randn(1, 3, 4, 4, 4, generator=g), size=(size,) * 3, mode="trilinear", align_corners=True
        )[0]
        ph = torch.rand(3, generator=g) * 2 * np.pi
        folds = torch.sin(f * (x + 0.08 * warp[0]) + ph[0]) * torch.sin(f * (y + 0.08 * warp[1]) + ph[1])
        folds = folds + 0.5 * torch.sin(f * (z + 0.08 * warp[2]) + ph[2])
        v = 0.1 + 0.45 * torch.tanh(2 * folds) + 0.03 * torch.randn(size, size, size, generator=g)
        out.append(torch.where(mask, v.clamp(-0.9, 1), torch.tensor(-1.0)))
    return torch.stack(out)[:, None]


def _write_dataset(vols: torch.Tensor, d: Path) -> Path:
    """A prepared dataset (manifest + float16 volumes) holding ``vols`` as they are."""
    (d / "volumes").mkdir(parents=True)
    items = []
    for i, v in enumerate(vols):
        np.save(d / "volumes" / f"{i:05d}.npy", v[0].numpy().astype(np.float16))
        items.append({"file": f"volumes/{i:05d}.npy", "source": f"made{i}", "label": None})
    intensity = {"lo": 0.0, "hi": 1.0, "units": "a.u.", "dtype": "float32"}
    manifest = {"resolution": vols.shape[-1], "modality": "mri", "intensity": intensity, "items": items}
    (d / "manifest.json").write_text(json.dumps(manifest | {"class_names": []}))
    return d


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every degradation of an independent real set, scored by evaluate --samples against 16 real
    volumes (8 vs 8, 20 splits for the floor)."""
    from model.metrics.calibration import KINDS, degrade

    root = tmp_path_factory.mktemp("calibration")
    real = _write_dataset(_population(16, 0), root / "real-set")
    indep = _population(8, 1)
    reports = {}
    for name, vols in ({"real": indep} | {k: degrade(indep, k) for k in KINDS}).items():
        folder = root / name
        folder.mkdir()
        for i, v in enumerate(vols):
            np.save(folder / f"{i:03d}.npy", v[0].numpy())
        reports[name] = evaluate(None, real, samples=folder, batch=4)
    return reports


def test_blur_blocks_shifts_and_collapse_score_worse_than_real_data(calibration: dict[str, Any]) -> None:
    """The headline is calibrated: an independent real set scores at the floor; blurred (sigma 1,
    then 2 voxels), blocky (2x nearest-neighbour) and intensity-shifted versions of it score worse,
    each by more than two floor standard deviations, and blur in that order."""
    h = {k: r["headline"] for k, r in calibration.items()}
    sd = h["real"]["floor_sd"]
    assert h["real"]["n"] == 8 and sd > 0
    assert abs(h["real"]["value"] - h["real"]["floor_mean"]) < 3 * sd
    assert h["blur1"]["value"] > h["real"]["value"] + 2 * sd
    assert h["blur2"]["value"] > h["blur1"]["value"] + 2 * sd
    for k in ("blocky", "shift", "collapse"):
        assert h[k]["value"] > h["real"]["value"] + 2 * sd, k
    assert calibration["real"]["warnings"] == []


def test_a_generator_that_ignores_its_latent_is_reported_as_collapsed(calibration: dict[str, Any]) -> None:
    collapsed, real = calibration["collapse"], calibration["real"]
    assert any("collapse" in w for w in collapsed["warnings"])
    assert collapsed["diversity"]["ms_ssim_generated"] == pytest.approx(1.0)
    assert collapsed["diversity"]["pooled_spread_ratio"] < 1e-6
    assert not any("collapse" in w for w in real["warnings"])
    h = collapsed["headline"]
    assert h["z"] > 2  # never scores as good as real data


def test_evaluate_samples_folder_from_the_cli(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """--samples scores a folder of anyone's volumes (here NIfTI scans, read with the real set's
    preprocessing) in place of a model; a folder with too few volumes is refused."""
    folder = tmp_path / "theirs"
    for i in range(4):  # the real set's own source scans: read as prepare read them, they score at the floor
        write_phantom(folder / f"s{i}.nii.gz", "ct", (40, 40, 40), seed=i)
    out = tmp_path / "report"
    args = ["evaluate", "--samples", str(folder), "--real", str(setup["ds"]), "--grid", "32", "--batch", "2"]
    assert main(args + ["-o", str(out)]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["model"] is None and r["samples"]["n"] == 4 and sorted(r["samples"]["files"])[0] == "s0.nii.gz"
    assert r["floor"]["n"] == 3 and _finite(r["headline"]["value"])
    assert r["headline"]["value"] < r["floor"]["mean"] + 2 * r["floor"]["sd"]
    assert r["distances"]["pooled8"]["fd"] < r["distances"]["pooled8"]["floor"]["fd"]["mean"]
    capsys.readouterr()
    # --encode-steps needs a model's encoder: refused with samples, and out of range with a model
    assert main(args + ["--encode-steps", "2", "-o", str(tmp_path / "steps")]) == 2
    assert "amortised encoder" in capsys.readouterr().err and not (tmp_path / "steps").exists()
    bad = ["evaluate", "--model", str(setup["hagan"]), "--real", str(setup["ds"]), "--encode-steps", "-1"]
    assert main(bad + ["-o", str(tmp_path / "bad")]) == 2
    assert "encode_steps must be 0 to 1000 for a hagan model" in capsys.readouterr().err
    (folder / "s3.nii.gz").unlink()
    (folder / "s2.nii.gz").unlink()
    assert main(args + ["-o", str(tmp_path / "few")]) == 2
    assert "at least 4 volumes" in capsys.readouterr().err


def test_evaluate_with_inception_weights_reports_slice_fids(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from model.metrics.inception import InceptionV3Features

    torch.manual_seed(0)  # random InceptionV3 weights in pytorch-fid's layout, BatchNorm stats from noise
    net = InceptionV3Features()
    for mod in net.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.momentum = None
    with torch.no_grad():
        net.train()(torch.rand(2, 3, 299, 299) * 2 - 1)
    sd = net.state_dict() | {"fc.weight": torch.randn(1008, 2048) * 0.01, "fc.bias": torch.zeros(1008)}
    weights = tmp_path / "pt_inception-2015-12-05.pth"
    torch.save(sd, weights)

    # the replayed set is the real set: slice FIDs at the real-vs-real floor
    kw = {"n": 6, "batch": 2, "grid": (32, 32, 32), "seed": 1, "ms_ssim_pairs": 1}
    r = evaluate(_Replay(setup["ds"]), setup["ds"], tmp_path / "report", **kw, inception=weights, device="cpu")
    mt = r["metrics"]
    assert mt["slice_feature_name"] == "slice-inception" and "InceptionV3" in mt["slice_features"]
    planes = ("axial", "coronal", "sagittal")
    for p in planes:
        v = mt["slicewise"][p]
        assert v["features"] == f"slice-inception-{p}" and _finite(v["fd"]) and _finite(v["kid"])
        assert _finite(v["floor"]["fd"]["mean"]) and v["floor"]["fd"]["mean"] > 0
        # the replayed set is the real set: at its floor
        assert v["fd"] <= v["floor"]["fd"]["mean"] + 2 * v["floor"]["fd"]["sd"]
    average = np.mean([mt["slicewise"][p]["fd"] for p in planes])
    assert mt["slicewise"]["average"]["fd"] == pytest.approx(average)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| floor FID |" in md and "| axial (FID-ax) |" in md and "| average (FID-avg) |" in md

    # the CLI passes --inception through (a missing file is refused before anything is generated)
    args = ["evaluate", "--model", str(setup["hagan"]), "--real", str(setup["ds"]), "--device", "cpu"]
    args += ["--inception", str(tmp_path / "absent.pth"), "-o", str(tmp_path / "cli")]
    assert main(args) == 2 and "absent.pth: no such weights file" in capsys.readouterr().err
