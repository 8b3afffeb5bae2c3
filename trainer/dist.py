"""Process-group setup for sharded training: from ``torchrun``'s environment, gloo on CPU and
NCCL on CUDA. Nothing here launches processes; ``torchrun`` does.

``torchrun --nproc-per-node N -m engine.cli train --config C`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
``init_from_env`` reads them, picks the backend from the device and binds one GPU per local
rank. Without those variables it returns a single-rank context with no process group, so
the same code trains in one plain process.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from trainer.config import DeviceKind
from trainer.errors import TrainerError

__all__ = ["DistContext", "init_from_env", "init_process_group", "detect_device_kind", "backend_for"]


@dataclasses.dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job. ``initialized`` is False for a single plain process."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str | None
    initialized: bool

    def slice_of(self, global_batch_size: int) -> tuple[int, int]:
        """``[start, end)`` of this rank's samples of a batch: contiguous slices in rank
        order, the first ``n % W`` one sample longer, so concatenating the ranks' slices
        gives the batch back. Every rank needs at least one sample: a batch with fewer rows
        than ranks raises (every rank sees the same batch size, so all of them can skip it).

        With unequal slices, ``loss_scale`` makes each rank's loss such that the averaged
        gradients equal those of the global-batch mean."""
        if global_batch_size < self.world_size:
            raise TrainerError(f"a batch of {global_batch_size} rows cannot give each of {self.world_size} "
                               "ranks a sample; skip it on every rank")
        base, extra = divmod(global_batch_size, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def loss_scale(self, global_batch_size: int) -> float:
        """Multiply this rank's *mean* local loss by this so that DDP's averaging (and the
        1/W of the pooled exchange) give exactly the gradient of the global-batch mean:
        ``W * local_n / global_n`` (1.0 when the slices are equal)."""
        lo, hi = self.slice_of(global_batch_size)
        return self.world_size * (hi - lo) / global_batch_size


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def detect_device_kind() -> DeviceKind:
    """The cost-model defaults for this host: h200/h100 from the CUDA device name, else cpu
    (other GPUs plan with h100 defaults; override memory in [sharding])."""
    if not torch.cuda.is_available():
        return DeviceKind.CPU
    name = torch.cuda.get_device_name(0).upper()
    return DeviceKind.H200 if "H200" in name else DeviceKind.H100


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise TrainerError("trainer.device = 'cuda' but torch sees no CUDA device; use 'cpu'")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(device)


def init_process_group(rank: int, world_size: int, init_method: str, *, device: str = "cpu",
                       local_rank: int | None = None, local_world_size: int | None = None,
                       timeout_s: float = 300.0) -> DistContext:
    """Join a process group explicitly (tests use a ``file://`` init in a temp dir)."""
    local_rank = rank if local_rank is None else local_rank
    dev = _pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = backend_for(dev)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(rank, world_size, local_rank, local_world_size or world_size, dev, backend, True)


def init_from_env(device: str = "auto", timeout_s: float = 300.0) -> DistContext:
    """Join the ``torchrun`` job described by the environment, or return a one-process context
    when ``WORLD_SIZE`` is unset. Blocks until every rank has joined (or ``timeout_s``)."""
    if "WORLD_SIZE" not in os.environ:
        return DistContext(0, 1, 0, 1, _pick_device(device, 0), None, False)
    try:
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    except (KeyError, ValueError) as exc:
        raise TrainerError(f"torchrun environment incomplete or malformed ({exc}); launch with torchrun") from None
    return init_process_group(rank, world, "env://", device=device, local_rank=local_rank,
                              local_world_size=local_world, timeout_s=timeout_s)
