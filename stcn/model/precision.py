"""Precision the network runs in: the --amp vocabulary every tool shares (train, eval, benchmarks)."""
from __future__ import annotations

import torch

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
#: The --amp values every tool accepts (tools/train uses the same three).
AMP_MODES = ("off", *AMP_DTYPES)


def amp_dtype_of(mode: str) -> str | None:
    """An --amp value as InferenceConfig.amp: None for "off", else the dtype name."""
    if mode not in AMP_MODES:
        raise ValueError(f"--amp must be one of {AMP_MODES}, got {mode!r}")
    return None if mode == "off" else mode


def check_amp(amp: str | None, device: torch.device | str) -> None:
    """AMP is a CUDA feature here: refuse it elsewhere instead of silently running fp32."""
    if amp is not None and torch.device(device).type != "cuda":
        raise ValueError(
            f"AMP ({amp}) runs on CUDA only, but the device is {torch.device(device)}; "
            "drop --amp (CPU inference runs in fp32)")
