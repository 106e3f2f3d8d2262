"""What fails one request and what fails the engine.

A RequestFault (or any other error raised while one request's row is sampled, detokenized or stop-matched) fails
that request alone. Errors of the device (CUDA errors, out of memory, a broken collective) fail the engine: they are
raised on, and the server exits to be replaced.
"""

from __future__ import annotations

import torch

_DEVICE_MARKERS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "NCCL", "device-side assert", "illegal memory access")


class RequestFault(RuntimeError):
    """One request cannot go on (e.g. its sampling probabilities are not finite)."""


def is_device_fault(error: BaseException) -> bool:
    """Whether `error` comes from the device or the collective rather than from one request's data."""
    if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: never one request's problem
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if isinstance(error, torch.OutOfMemoryError) or (accelerator_error and isinstance(error, accelerator_error)):
        return True
    text = str(error)
    return any(marker in text for marker in _DEVICE_MARKERS)
