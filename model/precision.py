"""Which arithmetic a model runs in: ``fp32``, or ``bf16`` where the CPU has it natively."""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 convolutions natively (oneDNN: AVX-512 BF16 or AMX)."""
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
