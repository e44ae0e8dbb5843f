"""The web page end to end: the real service (uvicorn, embedded queue, a tiny 128^3 HA-GAN) driven by
headless Chromium through Playwright; plus the PNG previews the page shows.

The browser tests need Debian's chromium at /usr/bin/chromium and the ``playwright`` Python package
(``make test`` installs both); without them they are skipped and say why.  Screenshots of the viewer
are saved under $VOXGEN_TEST_ARTIFACTS when set, otherwise under pytest's temporary directory.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from tests.conftest import service_nifti_upload, uvicorn_server

CHROMIUM = Path("/usr/bin/chromium")
# WebGL2 without a GPU: Chromium's software rasteriser (SwiftShader) behind ANGLE, which recent
# Chromium only enables for WebGL when asked to explicitly.
CHROMIUM_ARGS = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"]
JOB_TIMEOUT_MS = 120_000  # generous: the suite shares two CPU cores with other work


def _browser_missing() -> str | None:
    if not CHROMIUM.is_file():
        return "/usr/bin/chromium is not installed (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install playwright)"
    return None


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = os.environ.get("VOXGEN_TEST_ARTIFACTS")
    out = Path(d) / "viewer" if d else tmp_path_factory.mktemp("viewer-artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def server(service_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real service under uvicorn in a thread, on a port the OS picked, embedded queue."""
    from service.app import create_app
    from service.settings import Settings

    settings = Settings(
        models_dir=service_models_dir, storage_dir=tmp_path_factory.mktemp("viewer-storage"), redis_url=None
    )
    with uvicorn_server(create_app(settings), "viewer-uvicorn") as base:
        yield f"{base}/"


@pytest.fixture(scope="module")
def browser(server: str) -> Iterator[Any]:
    reason = _browser_missing()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


class Page:
    """A fresh page on the service, recording console errors and uncaught exceptions."""

    def __init__(self, browser: Any, url: str) -> None:
        self.errors: list[str] = []
        self.context = browser.new_context(viewport={"width": 1280, "height": 1600})
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.goto(url)
        self.page.wait_for_selector("body[data-ready=true]")

    def shot(self, selector: str, path: Path | None = None) -> np.ndarray:
        """An element as the user sees it: RGB array (rows, cols, 3)."""
        png = self.page.locator(selector).screenshot()
        if path is not None:
            path.write_bytes(png)
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))

    def wait_job(self, prefix: str) -> str:
        """Wait until the job box of a form says succeeded; its job id."""
        self.page.wait_for_selector(
            f"#{prefix}-job[data-state=succeeded], #{prefix}-job[data-state=error]", timeout=JOB_TIMEOUT_MS
        )
        box = self.page.locator(f"#{prefix}-job")
        assert box.get_attribute("data-state") == "succeeded", self.page.locator(f"#{prefix}-status").inner_text()
        return str(box.get_attribute("data-job-id"))


@pytest.fixture
def page(browser: Any, server: str) -> Iterator[Page]:
    p = Page(browser, server)
    p.page.set_default_navigation_timeout(JOB_TIMEOUT_MS)
    yield p
    p.context.close()
    assert p.errors == [], f"console errors: {p.errors}"


def drawn_fraction(rgb: np.ndarray) -> float:
    """Fraction of pixels that are not the viewer's black background."""
    return float((rgb.max(axis=2) > 12).mean())


def quadrants(rgb: np.ndarray) -> list[np.ndarray]:
    h, w = rgb.shape[0] // 2, rgb.shape[1] // 2
    return [rgb[:h, :w], rgb[:h, w:], rgb[h:, :w], rgb[h:, w:]]


def wait_volume(p: Page, canvas: str, suffix: str) -> None:
    p.page.wait_for_selector(f'{canvas}[data-volume$="{suffix}"]', timeout=JOB_TIMEOUT_MS)


# ------------------------------------------------------------------------------------ the page
def test_generate_view_window_and_download(page: Page, server: str, artifacts: Path, tmp_path: Path) -> None:
    pg = page.page
    assert pg.title().startswith("voxgen") and page.errors == []
    models = [o.get_attribute("value") for o in pg.locator("#model-select option").all()]
    assert {"tiny", "cond"} <= set(models)
    # a class-conditional model asks for the class, a plain one does not
    pg.select_option("#model-select", "cond")
    assert pg.locator("#label-field").is_visible()
    assert [o.inner_text() for o in pg.locator("#label-select option").all()] == ["healthy", "copd"]
    pg.select_option("#model-select", "tiny")
    assert not pg.locator("#label-field").is_visible()
    assert pg.locator("#traverse-section").is_visible()  # tiny has the direction "soft"

    before = page.shot("#viewer")
    assert drawn_fraction(before) < 0.05  # nothing drawn yet: the check below can fail

    pg.fill("#seed-input", "7")
    pg.click("#generate-button")
    job = page.wait_job("generate")
    wait_volume(page, "#viewer", f"{job}/volume_000.nii.gz")
    pg.wait_for_function("document.getElementById('preview-img').naturalWidth > 0")
    rgb = page.shot("#viewer", artifacts / "generate_viewer.png")
    pg.screenshot(path=str(artifacts / "generate_page.png"), full_page=True)
    # axial, coronal, sagittal and the 3D render, one per quadrant of the 2x2 layout: all drawn
    assert all(drawn_fraction(q) > 0.3 for q in quadrants(rgb)), [drawn_fraction(q) for q in quadrants(rgb)]
    assert rgb.std() > 10
    assert pg.evaluate("document.getElementById('preview-img').naturalWidth") == 3 * 128
    # shown in the model's own range, -1024..600 HU, as the controls say
    assert pg.locator("#wl-preset option:checked").inner_text().startswith("Model range (-1024.0 to 600.0 HU")
    assert pg.locator("#wl-window-out").inner_text() == "1624.0"
    assert pg.locator("#wl-level-out").inner_text() == "-212.0"

    # window / level: the preset and the sliders set the viewer's contrast, and the controls say so
    pg.select_option("#wl-preset", label="Brain (W 80, L 40)")
    assert pg.locator("#wl-window-out").inner_text() == "80.00"
    assert pg.locator("#wl-level-out").inner_text() == "40.00"
    pg.locator("#wl-level").fill("-500")
    assert pg.locator("#wl-level-out").inner_text() == "-500.0"
    assert pg.locator("#wl-preset").input_value() == "custom"
    narrow = page.shot("#viewer", artifacts / "generate_window.png")
    assert np.abs(narrow.astype(int) - rgb.astype(int)).mean() > 5

    # a single plane fills the canvas
    pg.check("input[name=view][value=axial]")
    assert drawn_fraction(page.shot("#viewer", artifacts / "generate_axial.png")) > 0.5

    # the download link saves the result NIfTI: 128^3 int16 HU with the model's 1 mm RAS affine
    assert pg.get_attribute("#download-link", "href") == f"jobs/{job}/files/volume_000.nii.gz"
    with pg.expect_download() as download:
        pg.click("#download-link")
    assert download.value.suggested_filename == "volume_000.nii.gz"
    download.value.save_as(tmp_path / "download.nii.gz")
    img = nib.load(tmp_path / "download.nii.gz")
    assert img.shape == (128, 128, 128) and img.get_data_dtype() == np.int16
    assert np.allclose(np.diag(img.affine)[:3], 1.0) and nib.aff2axcodes(img.affine) == ("R", "A", "S")
    data = np.asarray(img.dataobj)
    assert -1024 <= data.min() < data.max() <= 600


def test_traverse_slider_renders_each_step(page: Page, server: str, artifacts: Path) -> None:
    pg = page.page
    pg.select_option("#model-select", "tiny")
    pg.select_option("#direction-select", "soft")
    pg.fill("#seed-input", "11")
    pg.fill("#alpha-from", "-4")
    pg.fill("#alpha-to", "4")
    pg.fill("#alpha-n", "3")
    # one plane: software WebGL (no GPU) takes seconds per 3D render; the generate test covers all views
    pg.check("input[name=view][value=axial]")
    pg.click("#traverse-button")
    job = page.wait_job("traverse")
    status = httpx.get(f"{server}jobs/{job}").json()
    steps = status["result"]["steps"]
    assert [s["alpha"] for s in steps] == [-4, 0, 4] and status["result"]["attribute"] == "soft_tissue_ml"
    slider = pg.locator("#step-slider")
    assert slider.get_attribute("max") == "2" and slider.input_value() == "1"  # starts at alpha 0
    assert pg.locator("#steps-table tbody tr").count() == 3

    shots = []
    for i in (0, 2):
        slider.fill(str(i))
        wait_volume(page, "#viewer", f"{job}/step_{i:02d}.nii.gz")
        shots.append(page.shot("#viewer", artifacts / f"traverse_step_{i}.png"))
        assert drawn_fraction(shots[-1]) > 0.5
        text = pg.locator("#step-out").inner_text()
        assert text.startswith(f"step {i + 1} of 3: alpha ") and "soft_tissue_ml" in text
        measured = float(re.search(r"measured (\S+)$", text).group(1))
        assert measured == pytest.approx(steps[i]["measured"], rel=1e-3, abs=0.05)
        assert pg.locator("#steps-table tbody tr.current td").first.inner_text() == str(i)
        assert pg.locator("#wl-window-out").inner_text() == "1624.0"  # every step at the same window
    # the steps are different volumes (the direction moves the latent), shown at the same window
    assert np.abs(shots[0].astype(int) - shots[1].astype(int)).mean() > 1


def test_encode_shows_reconstruction_beside_input(page: Page, server: str, artifacts: Path, tmp_path: Path) -> None:
    pg = page.page
    pg.select_option("#model-select", "tiny")
    scan = tmp_path / "ball.nii.gz"
    scan.write_bytes(service_nifti_upload(tmp_path))
    pg.set_input_files("#encode-file", str(scan))
    assert pg.locator("#encode-reconstruct").is_checked()
    pg.click("#encode-button")
    job = page.wait_job("encode")
    wait_volume(page, "#encode-recon-canvas", f"{job}/reconstruction.nii.gz")
    wait_volume(page, "#encode-input-canvas", "ball.nii.gz")
    # the reconstruction (on the upload's grid) is overlaid on the upload
    overlay = f"{job}/reconstruction.nii.gz"
    pg.wait_for_function(f"document.getElementById('encode-input-canvas').dataset.overlay === '{overlay}'")
    pg.wait_for_function("['encode-input-png', 'encode-recon-png'].every(i => document.getElementById(i).naturalWidth)")
    pg.locator("#encode-result").screenshot(path=str(artifacts / "encode.png"))
    upload, recon = page.shot("#encode-input-canvas"), page.shot("#encode-recon-canvas")
    assert drawn_fraction(upload) > 0.05 and drawn_fraction(recon) > 0.3
    assert pg.evaluate("document.getElementById('encode-recon-png').naturalWidth") == 3 * 128
    links = [a.get_attribute("href") for a in pg.locator("#encode-links a").all()]
    assert links == [f"jobs/{job}/files/reconstruction.nii.gz", f"jobs/{job}/files/latent.npy"]
    # the encoded scan can now be the start of a traverse
    assert pg.locator("#traverse-source option[value=encode]").count() == 1


def test_page_and_bundle_are_served_offline(server: str) -> None:
    """Everything the page loads comes from the service itself: no external URL in the page."""
    html = httpx.get(server).text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    for path in ("static/app.js", "static/style.css", "static/vendor/niivue/niivue.umd.js"):
        r = httpx.get(server + path)
        assert r.status_code == 200 and len(r.content) > 1000, path
    assert "BSD 2-Clause" in httpx.get(server + "static/vendor/niivue/LICENSE").text
    assert "@niivue/niivue" in httpx.get(server + "static/vendor/niivue/VERSION").text
    assert httpx.get(server + "static/../app.py").status_code == 404


# ------------------------------------------------------------------------------------ previews
def _ct(spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Any:
    from model.hagan.config import HAGANConfig

    return HAGANConfig(resolution=128, width=0.25, latent_dim=8, spacing=spacing)


def test_preview_labels_say_the_convention() -> None:
    from worker.previews import LABEL_HEIGHT, render_preview

    img = render_preview(np.zeros((128, 128, 128), np.float32), _ct())
    assert img.shape == (LABEL_HEIGHT + 128, 3 * 128)
    band = img[:LABEL_HEIGHT]
    # the caption line and a label over each of the three tiles are drawn
    assert band[:14].max() == 255
    for k in range(3):
        assert band[14:, k * 128 : (k + 1) * 128].max() > 0


def test_preview_ct_window_and_mri_percentiles() -> None:
    from model.hagan.config import HAGANConfig
    from worker.previews import LABEL_HEIGHT, render_preview

    # CT: the model's HU window -> -1024 HU black, 600 HU white, the middle grey
    v = np.zeros((16, 16, 16), np.float32)
    v[:, :, :5], v[:, :, 11:] = -1.0, 1.0
    img = render_preview(v, _ct())[LABEL_HEIGHT:]
    assert img[:, :5].max() == 0 and img[:, 11:16].min() == 255 and abs(int(img[8, 8]) - 128) <= 1
    # MRI: a single very bright voxel does not darken the rest (1st-99.5th percentile scaling)
    mri = HAGANConfig(resolution=128, width=0.25, latent_dim=8, modality="mri")
    rng = np.random.default_rng(0)
    v = rng.uniform(-1, 0, (16, 16, 16)).astype(np.float32)
    v[8, 8, 8] = 1.0
    tiles = render_preview(v, mri)[LABEL_HEIGHT:]
    assert tiles.max() == 255 and np.median(tiles) > 100


def test_preview_keeps_physical_aspect() -> None:
    from worker.previews import LABEL_HEIGHT, render_preview

    # 2.5 mm slices, 1 mm in-plane: coronal and sagittal tiles are 2.5x as tall as the slice count
    img = render_preview(np.zeros((16, 32, 32), np.float32), _ct((1.0, 1.0, 2.5)))
    assert img.shape == (LABEL_HEIGHT + 40, 3 * 32)
