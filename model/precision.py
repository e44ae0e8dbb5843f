"""Which arithmetic a model runs in: ``fp32``, or ``bf16`` where the CPU has it natively."""

from __future__ import annotations

import functools
import platform

import torch

PRECISIONS = ("auto", "fp32", "bf16")


X86 = ("x86_64", "amd64", "i386", "i686")
# the CPU flags (Linux /proc/cpuinfo names) of native bf16 dot products on x86
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 convolutions natively: AVX-512 BF16 or AMX on x86, oneDNN's bf16
    support elsewhere (aarch64).  On x86, oneDNN's own check (``_is_mkldnn_bf16_supported``) is true on
    every AVX-512 CPU, where bf16 is emulated: on a Xeon with AVX-512 but neither AVX-512 BF16 nor AMX,
    256^3 generation took 4.3 s in bf16 against 1.3 s in fp32 (benchmarks/RESULTS.md), so such a CPU
    keeps fp32."""
    if platform.machine().lower() in X86:
        probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        if all(callable(p) for p in probes):
            return any(bool(p()) for p in probes)  # type: ignore[misc]
        flags = cpu_flags()  # older torch: the kernel's flags
        return flags is not None and any(f in flags for f in BF16_FLAGS)
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(option: str | None, device: torch.device) -> str:
    """'auto' / None -> bf16 on a CPU with native bf16, else fp32; 'fp32' and 'bf16' as given."""
    option = option or "auto"
    if option not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {option!r}")
    if option == "auto":
        return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"
    return option
