"""bf16 generation (HA-GAN): chosen by CPU capability, overridable, its error against fp32 bounded."""

from __future__ import annotations

import math

import pytest
import torch

from model.hagan.config import HAGANConfig
from model.hagan.model import HAGANModel
from model.precision import BF16_FLAGS, X86, cpu_flags, cpu_has_bf16, resolve_precision

# Measured (README): at 128^3 on an untrained width-0.25 model, bf16 against fp32 gave PSNR 51.5 dB
# over the [-1, 1] range and a largest difference of 0.044; a bf16 mantissa holds 8 bits (relative
# rounding 2^-9 per operation), so errors of 1e-2 after five conv + GroupNorm stages are expected and
# 40 dB / 0.1 leave room for other kernels' summation orders (oneDNN on AMX accumulates in fp32).
MIN_PSNR_DB, MAX_ABS = 40.0, 0.1


@pytest.fixture(scope="module")
def model() -> HAGANModel:
    return HAGANModel.init(HAGANConfig(resolution=128, latent_dim=16, width=0.25), seed=0)


def test_native_bf16_means_the_cpu_flags_not_onednn_emulation() -> None:
    """auto picks bf16 only where the CPU has bf16 dot products (AVX-512 BF16 or AMX).  oneDNN calls
    bf16 supported on every AVX-512 CPU and emulates it there, 3.3x slower than fp32 at 256^3 on a
    Xeon without AVX-512 BF16 or AMX (benchmarks/RESULTS.md): such a CPU must keep fp32."""
    import platform

    flags = cpu_flags()
    if platform.machine().lower() not in X86 or flags is None:
        pytest.skip("needs an x86 CPU whose flags /proc/cpuinfo lists")
    assert cpu_has_bf16() == any(f in flags for f in BF16_FLAGS), sorted(
        f for f in flags if "avx512" in f or "amx" in f
    )


def test_auto_follows_the_cpu_and_fp32_or_bf16_are_taken_as_given() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_bf16() else "fp32")
    assert resolve_precision(None, cpu) == resolve_precision("auto", cpu)
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("auto", torch.device("cuda")) == "fp32"  # until measured on a GPU
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", cpu)


def test_bf16_features_and_high_resolution_stages_stay_close_to_fp32(model: HAGANModel) -> None:
    """G^A whole, and G^H on a corner of its feature map (the full 128^3 G^H in bf16 takes a minute on
    CPUs without native bf16): bf16 activations with fp32 GroupNorm statistics, fp32 output."""
    z = model.sample_latents(2, 5)
    model.set_precision("fp32")
    f32 = model.features(z)
    with torch.inference_mode():
        v32 = model._gh_whole(f32[:, :, :6, :10, :10].contiguous())
    assert model.set_precision("bf16") == "bf16" and model.precision == "bf16"
    f16 = model.features(z)
    assert f16.dtype == torch.bfloat16
    with torch.inference_mode():
        v16 = model._gh_whole(f16[:, :, :6, :10, :10].contiguous())
    assert v16.dtype == torch.bfloat16
    model.set_precision("fp32")
    rel = float((f16.float() - f32).norm() / f32.norm())
    assert rel < 0.05, rel
    d = v16.float() - v32
    psnr = 10 * math.log10(4.0 / float((d**2).mean()))
    assert psnr > MIN_PSNR_DB and float(d.abs().max()) < MAX_ABS, (psnr, float(d.abs().max()))


def test_the_generated_volume_is_float32_and_slab_equals_whole_in_bf16(model: HAGANModel) -> None:
    """Switching precision rebuilds the converted weights; bf16 slabs use the whole-volume statistics
    like fp32 ones.  Checked on a 128^3 volume only where bf16 is native (fast)."""
    if not cpu_has_bf16():
        pytest.skip("this CPU has no native bf16: a 128^3 bf16 volume would take about a minute")
    z = model.sample_latents(1, 7)
    model.set_precision("bf16")
    whole = model.generate(z, mode="whole")
    slab = model.generate(z, mode="slab", slab_rows=16)
    model.set_precision("fp32")
    ref = model.generate(z)
    assert whole.dtype == torch.float32 and torch.equal(whole, slab)
    d = whole - ref
    assert 10 * math.log10(4.0 / float((d**2).mean())) > MIN_PSNR_DB and float(d.abs().max()) < MAX_ABS


def test_bf16_encoding_stays_close_to_fp32(model: HAGANModel) -> None:
    """Encoding follows the precision: bf16 weights and activations for E^H and E^G (GroupNorm
    statistics and affine in float32).  Measured (README): 1.0 % relative difference in the latent at
    256^3 on the authors' width; bounded at 3 % here (the same per-operation bf16 rounding as generation's 5 % bound on
    G^A's features, over fewer stages).  Where bf16 is native only (fast)."""
    if not cpu_has_bf16():
        pytest.skip("this CPU has no native bf16: bf16 convolutions would take minutes")
    x = model.generate(model.sample_latents(2, 3))
    model.set_precision("fp32")
    z32 = model.encode(x)
    model.set_precision("bf16")
    z16 = model.encode(x)
    model.set_precision("fp32")
    assert z16.dtype == torch.float32 and not torch.equal(z16, z32)  # bf16 did run
    rel = float((z16 - z32).norm() / z32.norm())
    assert rel < 0.03, rel


def test_families_without_a_bf16_path_refuse_it() -> None:
    from model.alphawgan.model import AlphaWGANModel

    cls = AlphaWGANModel
    m = cls.__new__(cls)
    assert m.set_precision("auto") == "fp32" and m.set_precision("fp32") == "fp32"
    with pytest.raises(ValueError, match="bf16"):
        m.set_precision("bf16")


def test_the_worker_applies_its_precision_and_memory_budget(
    model: HAGANModel, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    from worker import jobs
    from worker.settings import get_settings

    model.save_pretrained(tmp_path / "m")
    monkeypatch.setenv("VOXGEN_PRECISION", "bf16")
    monkeypatch.setenv("VOXGEN_MEMORY_BUDGET_MB", "64")  # the lowest allowed
    get_settings.cache_clear()
    monkeypatch.setattr(jobs, "_MODELS", {})
    try:
        m = jobs.get_model(tmp_path, "m", "cpu")
        assert m.precision == "bf16" and m.memory_budget_mb == 64
        m.memory_budget_mb = 8  # below the 24 MiB this tiny model needs whole: slabs
        calls: list[str] = []
        m.set_precision("fp32")
        m.generate(m.sample_latents(1, 0), progress=lambda d, t, s: calls.append(s))
        assert "statistics" in calls
    finally:
        get_settings.cache_clear()
