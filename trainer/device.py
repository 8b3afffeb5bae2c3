"""Resolve the trainer's device from config (``auto | cpu | cuda | cuda:N``)."""

from __future__ import annotations

import torch

from trainer.errors import TrainerError

__all__ = ["resolve_device"]


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """``auto`` (or None) = ``cuda`` when a GPU is visible, else ``cpu``. A CUDA device that
    does not exist raises TrainerError naming it and the visible device count."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise TrainerError(
            f"trainer.device = {spec!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = dev.index or 0
        if index >= count:
            raise TrainerError(
                f"trainer.device = {spec!r} but {count} CUDA device(s) are visible; "
                "use trainer.device = 'auto' or 'cpu'"
            )
    elif dev.type != "cpu":
        raise TrainerError(f"trainer.device = {spec!r}: only cpu and cuda devices are supported")
    return dev
