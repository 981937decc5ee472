"""Compute precision of the frozen pass and of training: names, how ``auto`` resolves, autocast and loss scaling.

One ``--precision`` governs both the frozen forward of the preload and every
trial's training step. Its names (``auto``, ``fp32``, ``bf16``, ``fp16``) live in
:data:`medsweep.spaces.PRECISION_NAMES` so that config rules check them without
torch; the dtypes live here.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from medsweep.errors import ConfigError
from medsweep.spaces import PRECISION_NAMES

# A resolved precision -> the autocast dtype (fp32: autocast off).
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
assert set(PRECISIONS) == set(PRECISION_NAMES) - {"auto"}


def check_precision(requested: str) -> None:
    """Raise ConfigError for a ``--precision`` that is none of ``auto``, ``fp32``, ``bf16``, ``fp16``."""
    if requested not in PRECISION_NAMES:
        raise ConfigError(f"--precision must be {', '.join(PRECISION_NAMES)}; got {requested!r}")


def resolve_precision(requested: str, device: torch.device | str) -> str:
    """``auto``: bf16 on a GPU that has it, else fp16 on CUDA, fp32 on CPU (where autocast gains little); else as asked.

    Raises ConfigError for a name that is none of ``auto``, ``fp32``, ``bf16``, ``fp16``.
    """
    check_precision(requested)
    if requested != "auto":
        return requested
    if torch.device(device).type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """Autocast to ``precision`` on ``device`` (a resolved name); fp32 runs as written (autocast disabled)."""
    return torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """The loss scaler of a training step: on for fp16 on CUDA, whose small gradients underflow fp16
    without it; a pass-through otherwise (bf16 has fp32's range)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")


def allow_tf32() -> None:
    """Let fp32 matmuls and convolutions use TF32 tensor cores on GPUs that have them (Ampere and later):
    fp32 trials run several times faster there at a precision well within what training tolerates."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
