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

from tests.conftest import uvicorn_server

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


def _fetch_nifti(url: str, tmp_path: Path) -> Any:
    p = tmp_path / url.rsplit("/", 1)[-1]
    p.write_bytes(httpx.get(url).content)
    return nib.load(p)


def _flipped_upload(path: Path) -> None:
    """A CT-like scan stored left-right flipped (LAS: x decreasing along the first axis), with an
    off-centre bright block: a difference computed in the wrong voxel order would not match."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, 32)] * 3, indexing="ij")
    v = np.where(x**2 + y**2 + z**2 < 0.6, 40.0, -1000.0).astype(np.float32)
    v[4:12, 20:28, 2:10] = 900.0  # beyond the model's 600 HU window: clipped, as the model sees it
    ras = v.transpose(2, 1, 0)  # (x, y, z) in RAS order
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])
    affine[0, 3] = 62.0  # the same world positions as the RAS array with its origin at 0
    nib.save(nib.Nifti1Image(ras[::-1].copy(), affine), path)


def test_encode_shows_reconstruction_beside_input(page: Page, server: str, artifacts: Path, tmp_path: Path) -> None:
    """Upload, reconstruction and their difference side by side, all on the upload's grid; the
    difference is the reconstruction minus the upload windowed as the model sees it, voxel by voxel
    in world space although the upload stores its voxels flipped."""
    pg = page.page
    pg.select_option("#model-select", "tiny")
    scan = tmp_path / "ball.nii.gz"
    _flipped_upload(scan)
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
    wait_volume(page, "#encode-diff-canvas", f"{job}/difference")
    diff = page.shot("#encode-diff-canvas", artifacts / "encode_difference.png")
    assert drawn_fraction(diff) > 0.3
    caption = pg.locator("#encode-diff-caption").inner_text()
    assert caption.startswith("Difference: reconstruction − upload in the model's units (HU"), caption
    # the same difference from the files, both brought to RAS order by nibabel
    rec_img = _fetch_nifti(f"{server}jobs/{job}/files/reconstruction.nii.gz", tmp_path)
    up = nib.as_closest_canonical(nib.load(scan))
    assert np.allclose(rec_img.affine, up.affine) and rec_img.shape == up.shape
    expected = np.abs(np.asarray(rec_img.dataobj, np.float64) - np.clip(up.get_fdata(), -1024, 600)).mean()
    unflipped = np.abs(np.asarray(rec_img.dataobj, np.float64) - np.clip(up.get_fdata()[::-1], -1024, 600)).mean()
    mean_abs = float(pg.get_attribute("#encode-diff-canvas", "data-mean-abs"))
    assert mean_abs == pytest.approx(expected, rel=1e-4) and abs(unflipped - expected) > 1.0, (mean_abs, expected)
    # the overlay of the reconstruction on the upload is there, off until asked for
    assert not pg.locator("#encode-overlay").is_checked()
    pg.check("#encode-overlay")
    assert np.abs(page.shot("#encode-input-canvas").astype(int) - upload.astype(int)).mean() > 0.5
    assert pg.evaluate("document.getElementById('encode-recon-png').naturalWidth") == 3 * 128
    links = [a.get_attribute("href") for a in pg.locator("#encode-links a").all()]
    assert links == [f"jobs/{job}/files/reconstruction.nii.gz", f"jobs/{job}/files/latent.npy"]
    # the encoded scan can now be the start of a traverse
    assert pg.locator("#traverse-source option[value=encode]").count() == 1


def test_encode_fit_steps_go_with_the_request(page: Page, server: str, tmp_path: Path) -> None:
    """The page's fit steps reach the job: its provenance records the request's ``steps``."""
    pg = page.page
    pg.select_option("#model-select", "tiny")
    scan = tmp_path / "ball.nii.gz"
    _flipped_upload(scan)
    pg.set_input_files("#encode-file", str(scan))
    pg.uncheck("#encode-reconstruct")
    pg.fill("#encode-steps", "2")
    pg.click("#encode-button")
    job = page.wait_job("encode")
    prov = httpx.get(f"{server}jobs/{job}/files/provenance.json").json()
    assert prov["request"]["steps"] == 2 and not prov["request"]["reconstruct"], prov["request"]


def _generate(page: Page) -> str:
    """Generate tiny, seed 7, from the page; the job id once its volume is shown."""
    pg = page.page
    pg.select_option("#model-select", "tiny")
    pg.fill("#seed-input", "7")
    pg.click("#generate-button")
    job = page.wait_job("generate")
    wait_volume(page, "#viewer", f"{job}/volume_000.nii.gz")
    return job


def test_axial_chosen_before_the_first_volume_shows_one_plane(page: Page, artifacts: Path) -> None:
    """The bug: choosing a single plane before anything was loaded left all four panes shown once
    the first volume came.  What is drawn must be what is chosen, whenever it was chosen."""
    pg = page.page
    pg.check("input[name=view][value=axial]")  # before the viewer exists
    _generate(page)
    first = page.shot("#viewer", artifacts / "axial_before_load.png")
    pg.check("input[name=view][value=multi]")
    four = page.shot("#viewer", artifacts / "axial_before_load_four.png")
    pg.check("input[name=view][value=axial]")  # chosen again with the volume shown: the known-good axial
    axial = page.shot("#viewer", artifacts / "axial_after_load.png")
    assert np.abs(four.astype(int) - axial.astype(int)).mean() > 5  # the two layouts differ
    assert np.abs(first.astype(int) - axial.astype(int)).mean() < 1, "the first volume is not shown as chosen"


def test_voxel_readout_and_slice_position(page: Page, server: str, tmp_path: Path) -> None:
    """Under the pointer: the voxel value in HU (the file's value at that voxel), its voxel index and
    position in mm; the slice position (index and mm) follows the crosshair."""
    pg = page.page
    pg.check("input[name=view][value=axial]")
    job = _generate(page)
    img = _fetch_nifti(f"{server}jobs/{job}/files/volume_000.nii.gz", tmp_path)
    data = np.asarray(img.dataobj)
    slices = pg.locator("#viewer-slices")
    vox = [int(x) for x in slices.get_attribute("data-vox").split(",")]
    mm = [float(x) for x in slices.get_attribute("data-mm").split(",")]
    # the crosshair's voxel and its position agree with the file's affine (1 mm voxels, RAS)
    assert np.allclose(img.affine[:3, :3] @ vox + img.affine[:3, 3], mm, atol=0.5 + 1e-6), (vox, mm)
    text = slices.inner_text()
    assert f"axial {vox[2]} of 0–127 (z = " in text and f"sagittal {vox[0]} of 0–127" in text, text
    assert text.endswith(f"crosshair value {int(data[tuple(vox)])} HU"), text

    box = pg.locator("#viewer").bounding_box()
    pointer = pg.locator("#viewer-pointer")
    seen = set()
    for fx, fy in ((0.5, 0.5), (0.3, 0.4), (0.7, 0.62)):
        pg.mouse.move(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
        pg.wait_for_function("document.getElementById('viewer-pointer').dataset.vox !== undefined")
        at = [int(x) for x in pointer.get_attribute("data-vox").split(",")]
        value = float(pointer.get_attribute("data-value"))
        assert at[2] == vox[2], (at, vox)  # the axial slice on screen is the crosshair's
        assert value == data[tuple(at)], (at, value, data[tuple(at)])
        assert pointer.inner_text().startswith(f"Pointer: {int(value)} HU at voxel ({at[0]}, {at[1]}, {at[2]}), ")
        seen.add(tuple(at))
    assert len(seen) == 3
    # a click moves the crosshair there: the slice readout follows (the sagittal and coronal slices)
    pg.mouse.click(box["x"] + 0.7 * box["width"], box["y"] + 0.62 * box["height"])
    pg.wait_for_function(
        "(v) => document.getElementById('viewer-slices').dataset.vox === v", arg=",".join(map(str, at))
    )
    pg.mouse.move(box["x"] - 5, box["y"] - 5)  # off the canvas
    assert pointer.inner_text() == "Pointer: outside the slices"


CARD = """# tiny test model

A **bold** claim, *emphasis*, `code`, [a link](https://example.org/x) and [a file](../other/README.md).

<script>window.__pwned = 1</script>
<img src="x" onerror="window.__pwned = 2">

| metric | value |
|---|---|
| fd_texture | 12.5 |

- one
- two with `code`

```
voxgen generate --model tiny --seed 1 -o x.nii.gz
```
"""


def test_model_card_is_shown_safely(page: Page, server: str, service_models_dir: Path) -> None:
    """The page shows GET /models/{name}/card rendered from markdown without ever parsing the card as
    HTML: markup in a card is shown as text and runs nothing."""
    (service_models_dir / "tiny" / "README.md").write_text(CARD)
    pg = page.page
    pg.reload()  # the model list (which says who has a card) again, with the card in place
    pg.wait_for_selector("body[data-ready=true]")
    pg.select_option("#model-select", "cond")  # no card
    pg.wait_for_selector("#model-card[data-model=cond]")
    assert pg.locator("#model-card").get_attribute("data-state") == "none"
    pg.select_option("#model-select", "tiny")
    pg.wait_for_selector("#model-card[data-model=tiny][data-state=shown]")
    pg.click("#model-card summary")
    body = pg.locator("#model-card-body")
    assert body.locator("h3").inner_text() == "tiny test model"
    assert body.locator("strong").inner_text() == "bold" and body.locator("em").inner_text() == "emphasis"
    assert body.locator("table td").all_inner_texts() == ["fd_texture", "12.5"]
    assert body.locator("ul li").all_inner_texts() == ["one", "two with code"]
    assert "voxgen generate --model tiny" in body.locator("pre code").inner_text()
    link = body.locator("a")
    assert link.count() == 1 and link.get_attribute("href") == "https://example.org/x"
    assert link.get_attribute("rel") == "noopener noreferrer"
    # the raw HTML is text: no element made from it, nothing ran
    assert body.locator("script, img, [onerror]").count() == 0
    assert "<script>window.__pwned = 1</script>" in body.inner_text()
    assert pg.evaluate("window.__pwned") is None
    assert "tiny" in pg.locator("#model-card summary").inner_text()


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
