"""Device strings and the vendor modules some devices need."""

from __future__ import annotations

import importlib.util

import torch

from .errors import BackendUnavailableError


def device_kind(device: str) -> str:
    """``"cuda:1"`` -> ``"cuda"``."""
    return device.split(":", 1)[0]


def ensure_device(device: str) -> None:
    """Import what the device needs and check it exists; BackendUnavailableError otherwise."""
    kind = device_kind(device)
    if kind == "cpu":
        return
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailableError(f"device {device!r}: no CUDA GPU is visible to torch")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise BackendUnavailableError(
                f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
        return
    if kind == "mlu":
        if importlib.util.find_spec("torch_mlu") is None:
            raise BackendUnavailableError(
                f"device {device!r}: torch_mlu (Cambricon's PyTorch extension) is not installed"
            )
        import torch_mlu  # noqa: F401  (registers the "mlu" device with torch)

        if not torch.mlu.is_available():  # type: ignore[attr-defined]
            raise BackendUnavailableError(f"device {device!r}: torch_mlu sees no MLU card")
        return
    raise BackendUnavailableError(f"device {device!r}: unknown device kind")


def pinned_memory_available(device: str) -> bool:
    """Whether host staging for ``device`` can use page-locked memory."""
    kind = device_kind(device)
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mlu":
        return importlib.util.find_spec("torch_mlu") is not None
    return False


def synchronize(device: str) -> None:
    """Wait for all queued work on ``device``."""
    kind = device_kind(device)
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "mlu":
        torch.mlu.synchronize(device)  # type: ignore[attr-defined]
