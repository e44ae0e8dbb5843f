"""Model directories: the format version in config.json, and the torch-free cached readers the API uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.checkpoint import FORMAT_VERSION, ModelDirError, read_config, read_config_cached
from model.hagan.config import HAGANConfig
from model.hagan.model import HAGANModel
from model.registry import from_pretrained


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    HAGANModel.init(HAGANConfig(resolution=128, latent_dim=8, width=0.25), seed=0).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_config_json_carries_its_format_version_and_older_directories_load(model_dir: Path) -> None:
    raw = json.loads((model_dir / "config.json").read_text())
    assert raw["format_version"] == FORMAT_VERSION and next(iter(raw)) == "format_version"
    assert "format_version" not in read_config(model_dir)  # the family's config, as it was
    m = from_pretrained(model_dir)
    del raw["format_version"]  # a directory written before format versions (format 0)
    (model_dir / "config.json").write_text(json.dumps(raw))
    assert from_pretrained(model_dir).config.to_dict() == m.config.to_dict()
    (model_dir / "config.json").write_text(json.dumps(raw | {"format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ModelDirError, match="format_version"):
        from_pretrained(model_dir)


def test_the_cached_config_is_re_read_when_the_file_changes(model_dir: Path) -> None:
    first = read_config_cached(model_dir)
    first["description"] = "edited by a caller"  # a copy: the cache is not touched
    assert read_config_cached(model_dir)["description"] != "edited by a caller"
    raw = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(raw | {"description": "a new card line"}))
    st = (model_dir / "config.json").stat()
    os.utime(model_dir / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a coarse clock
    assert read_config_cached(model_dir)["description"] == "a new card line"


def test_reading_configs_and_directions_imports_no_torch(model_dir: Path) -> None:
    code = (
        "import sys; from model.checkpoint import read_config_cached, direction_names; "
        f"c = read_config_cached({str(model_dir)!r}); print(c['family'], direction_names({str(model_dir)!r}), "
        "'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["hagan", "[]", "False"]
