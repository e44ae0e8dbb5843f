"""model/families.py: the one list of model families that the CLI, the API, the loader and the
trainer lookup read."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from model import families


def test_every_entry_names_parts_that_exist_and_agree() -> None:
    for name, f in families.FAMILIES.items():
        assert f.name == name
        model_class = f.model_class()
        assert getattr(model_class, "family", name) in families.sharing_config(f.config)  # may serve several
        assert model_class.config_class is f.config_class()
        assert callable(f.trainer_module().train) and callable(f.init_function())
        assert f.encoder in ("amortised", "projection")
    assert families.with_encoder("amortised") == ("hagan", "alphawgan")
    assert set(families.get("splitshuffle").variant_names()) >= {"baseline", "split-shuffle"}
    with pytest.raises(ValueError, match="unknown model family 'nope'; known: hagan"):
        families.get("nope")


def test_the_cli_the_api_the_loader_and_the_trainer_read_it() -> None:
    from model.cli import build_parser
    from model.registry import FAMILIES, family_class
    from model.training import trainer_module
    from service.schemas import TrainRequest

    parser = build_parser()
    for verb in ("init", "train"):
        with pytest.raises(SystemExit):
            parser.parse_args([verb, "--family", "nope", "-o", "x", "--modality", "ct", "--data", "d"])
    assert FAMILIES == families.NAMES
    for name in families.NAMES:
        assert family_class(name) is families.get(name).model_class()
        assert trainer_module(name) is families.get(name).trainer_module()
        TrainRequest(family=name, data="d", name="m")
    with pytest.raises(ValidationError):
        TrainRequest(family="nope", data="d", name="m")


def test_reading_the_registry_imports_no_torch() -> None:
    code = "import sys, model.families, service.schemas; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
