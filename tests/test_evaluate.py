"""`voxgen evaluate` end to end on tiny models and a tiny prepared dataset: the report (JSON and
Markdown), the embedding plot and the montages; and a model that replays the real set scores at
the real-vs-real floor while an untrained network does not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from model.alphawgan.config import AlphaWGANConfig
from model.alphawgan.model import AlphaWGANModel
from model.cli import main
from model.data.datasets import VolumeDataset, prepare_dataset
from model.data.phantoms import write_phantom
from model.hagan.config import HAGANConfig
from model.hagan.infer import HAGANModel
from model.metrics.evaluate import evaluate


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Small networks run faster on one thread; the thread count is restored for the next module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    for i in range(6):
        write_phantom(root / "src" / f"chest{i}.nii.gz", "ct", (40, 40, 40), seed=i)
    prepare_dataset(root / "src", root / "ds", HAGANConfig(resolution=128))
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
    assert json.loads(capsys.readouterr().out)["n_generated"] == 4
    r = json.loads((out / "report.json").read_text())
    assert r["model"]["family"] == "hagan" and r["model"]["output_shape"] == [128, 128, 128]
    assert r["generated"]["n"] == 4 and r["generated"]["seed"] == 7 and r["real"]["n"] == 6
    assert r["grid"] == [64, 64, 64] and r["real"]["resampled_to"] == [64, 64, 64]
    assert set(r["features"]) == {"pooled8", "encoder-hagan"} and r["primary_features"] == "encoder-hagan"
    mt = r["metrics"]
    for k in ("pooled8", "encoder-hagan"):
        assert _finite(mt["features"][k]["mmd2"]) and mt["features"][k]["frechet"] >= 0
    for p in ("axial", "coronal", "sagittal", "average"):
        assert _finite(mt["slicewise"][p]["frechet"]) and _finite(mt["slicewise"][p]["mmd2"])
    assert mt["slicewise"]["average"]["frechet"] == pytest.approx(
        np.mean([mt["slicewise"][p]["frechet"] for p in ("axial", "coronal", "sagittal")])
    )
    assert mt["bmmd2"]["n"] == 2 and mt["bmmd2"]["batch_size"] == 2 and mt["bmmd2"]["mean"] > 0
    assert 0 <= mt["ms_ssim"]["generated"]["mean"] <= 1 and mt["ms_ssim"]["generated"]["n"] == 2
    assert 0 <= mt["ms_ssim"]["real"]["mean"] <= 1 and mt["ms_ssim"]["real"]["n"] == 3
    assert mt["reconstruction"]["n"] == 6 and mt["reconstruction"]["mae"] > 0
    # an untrained network is far from the real set: above the real-vs-real floor
    floor = r["real_vs_real"]["features"]["pooled8"]
    assert mt["features"]["pooled8"]["frechet"] > floor["frechet"]

    md = (out / "report.md").read_text()
    assert "| encoder-hagan |" in md and "| average |" in md and "seed 7" in md and "n = 6 of 6" in md
    emb = np.asarray(Image.open(out / "embedding.png").convert("RGB"))
    red = ((emb[..., 0] > 180) & (emb[..., 1] < 80) & (emb[..., 2] < 80)).sum()
    blue = ((emb[..., 2] > 150) & (emb[..., 0] < 80)).sum()
    assert red > 50 and blue > 50  # both groups and their ellipses are drawn
    mont = Image.open(out / "montage_generated.png")
    assert mont.size[0] > 3 * 64 and mont.size[1] >= 4 * 64  # 4 rows of axial | coronal | sagittal
    assert (out / "montage_real.png").is_file()
    with np.load(out / "features.npz", allow_pickle=False) as z:  # the features behind the plot
        assert z["real/encoder-hagan"].shape == (6, 16) and z["generated/pooled8"].shape == (4, 512)


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


def test_replaying_the_real_set_scores_at_zero_and_beats_an_untrained_model(setup: dict[str, Path]) -> None:
    kw = {"n": 6, "batch": 2, "grid": (32, 32, 32), "seed": 1}
    best = evaluate(_Replay(setup["ds"]), setup["ds"], **kw)["metrics"]
    untrained = evaluate(setup["alpha"], setup["ds"], **kw, device="cpu")["metrics"]
    assert best["features"]["pooled8"]["frechet"] == pytest.approx(0.0, abs=1e-6)  # identical sets
    assert best["slicewise"]["average"]["frechet"] == pytest.approx(0.0, abs=1e-6)
    assert abs(best["features"]["pooled8"]["mmd2"]) < 0.2 * untrained["features"]["pooled8"]["mmd2"]
    assert untrained["features"]["pooled8"]["frechet"] > 1.0
    assert best["bmmd2"]["mean"] < untrained["bmmd2"]["mean"]
    assert untrained["reconstruction"]["n"] == 6  # alpha-WGAN-GP: its encoder reconstructs (64^3 output)
    again = evaluate(setup["alpha"], setup["ds"], **kw, device="cpu")["metrics"]  # same seed, same numbers
    assert again["features"] == untrained["features"] and again["ms_ssim"] == untrained["ms_ssim"]


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

    # the replayed set is the real set: slice FIDs ~0, while two halves of the real set differ
    kw = {"n": 6, "batch": 2, "grid": (32, 32, 32), "seed": 1, "ms_ssim_pairs": 1}
    r = evaluate(_Replay(setup["ds"]), setup["ds"], tmp_path / "report", **kw, inception=weights, device="cpu")
    mt, floor = r["metrics"], r["real_vs_real"]["slicewise"]
    assert mt["slice_feature_name"] == "slice-inception" and "InceptionV3" in mt["slice_features"]
    planes = ("axial", "coronal", "sagittal")
    for p in (*planes, "average"):
        assert _finite(mt["slicewise"][p]["frechet"]) and _finite(mt["slicewise"][p]["mmd2"])
        assert _finite(floor[p]["frechet"]) and floor[p]["frechet"] > 0
    average = np.mean([mt["slicewise"][p]["frechet"] for p in planes])
    assert mt["slicewise"]["average"]["frechet"] == pytest.approx(average)
    assert mt["slicewise"]["average"]["frechet"] < 1e-6 * floor["average"]["frechet"]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| real-vs-real FID |" in md and "| axial (FID-ax) |" in md and "| average (FID-avg) |" in md

    # the CLI passes --inception through (a missing file is refused before anything is generated)
    args = ["evaluate", "--model", str(setup["hagan"]), "--real", str(setup["ds"]), "--device", "cpu"]
    args += ["--inception", str(tmp_path / "absent.pth"), "-o", str(tmp_path / "cli")]
    assert main(args) == 2 and "absent.pth: no such weights file" in capsys.readouterr().err
