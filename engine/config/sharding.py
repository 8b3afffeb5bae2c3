"""Config section [sharding]: how embedding tables are placed across devices (trainer.planner).

Example (TOML):

    [sharding]
    enabled = true
    device = "h100"              # cost-model defaults: cpu | h100 | h200 | auto
    devices_per_host = 8
    comm_precision = "bf16"      # all-to-all of pooled embeddings and their gradients
    tables = { user_id = "row_wise" }   # force a sharding type per table

The global batch is ``trainer.batch_size``; under ``torchrun`` each of the N ranks trains on
its own contiguous slice (about ``batch_size / N`` samples) of every batch
(``trainer.dist.DistContext.slice_of``). Tables ``[row_cache]`` holds are placed *cached*.
"""

from __future__ import annotations

import dataclasses
import enum

__all__ = ["ShardingConfig", "ShardingType", "DeviceKind", "CommPrecision"]


class ShardingType(enum.Enum):
    """How one table is split across ranks (Mudigere et al. 2021, section 4)."""

    DATA_PARALLEL = "data_parallel"  # a full replica on every rank; gradients all-reduced
    TABLE_WISE = "table_wise"  # the whole table on one rank
    ROW_WISE = "row_wise"  # contiguous row ranges across all ranks; partial sums reduced
    COLUMN_WISE = "column_wise"  # column ranges (a slice of the dim) on several ranks
    TABLE_ROW_WISE = "table_row_wise"  # row-wise across the ranks of one host


class DeviceKind(enum.Enum):
    """Which hardware defaults the cost model uses (trainer.topology)."""

    AUTO = "auto"  # the GPU model torch reports (h100/h200), else cpu
    CPU = "cpu"
    H100 = "h100"
    H200 = "h200"


class CommPrecision(enum.Enum):
    """Element type on the wire for the embedding all-to-all (forward and backward)."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    enabled: bool = False
    device: DeviceKind = DeviceKind.AUTO
    # Ranks per host; 0 = the device default (cpu: all ranks on one host, GPUs: 8).
    devices_per_host: int = 0
    # Overrides of the device defaults; 0 = use the default of `device`.
    device_memory_bytes: int = 0
    host_memory_bytes: int = 0
    # Fraction of device memory kept free for the dense model, activations and the allocator.
    memory_headroom_fraction: float = 0.2
    # Tables at most this big (weights + optimizer state) may be replicated on every rank.
    data_parallel_max_bytes: int = 4 << 20
    comm_precision: CommPrecision = CommPrecision.FP32
    # Overlap the next batch's id distribution with the current step.
    pipeline: bool = True
    # Force a sharding type for named tables; the others are chosen by the cost model.
    tables: dict[str, ShardingType] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.devices_per_host < 0:
            raise ValueError(f"devices_per_host must be >= 0 (0 = default), got {self.devices_per_host}")
        if self.device_memory_bytes < 0 or self.host_memory_bytes < 0:
            raise ValueError("device_memory_bytes and host_memory_bytes must be >= 0 (0 = default)")
        if not 0.0 <= self.memory_headroom_fraction < 1.0:
            raise ValueError(
                f"memory_headroom_fraction must be in [0, 1), got {self.memory_headroom_fraction}"
            )
        if self.data_parallel_max_bytes < 0:
            raise ValueError("data_parallel_max_bytes must be >= 0 (0 = never replicate)")
