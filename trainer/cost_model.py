"""Per-shard memory and time estimates for the sharding planner. Pure arithmetic, no torch.

What one training step costs a rank that holds a shard of ``rows x cols`` of a table, for a
global batch of ``B`` samples (``W`` ranks, ``L`` = lookups per sample of the table):

memory (device)
    weights + dense gradient (``elem`` bytes each per element) + ``slots`` fp32 optimizer
    tensors per element (sgd 0, adagrad 1, adam 2), plus step buffers: the ids it receives
    (8 bytes each) and its pooled output and that output's gradient (fp32, ``B x cols``).
    A *cached* shard keeps only ``cache_rows`` on the device; the full table with its
    optimizer state lives in host memory (and on SSD behind it).
compute
    embedding-bag forward and backward read/write ``ids x cols x elem`` bytes, and the
    optimizer updates ``rows x cols x (2 elem + 8 slots)`` bytes at device bandwidth, where
    ``rows`` is the whole shard with dense gradients and at most the ids it saw with sparse
    ones (``StepShape.sparse_updates``; replicated tables are always dense, for DDP). A cached shard pays its misses at host-to-device bandwidth.
communication
    model-parallel shards: the ids in (8 bytes each), the pooled output out and its
    gradient back (``B x cols x comm`` bytes each way, where ``comm`` is the wire element
    size), a fraction ``(W-1)/W`` of which crosses the network. Row-wise shards send full
    ``B x cols`` partial sums, which is why row-wise costs more traffic than table-wise.
    Data-parallel replicas: a ring all-reduce of the whole gradient, ``2 (W-1)/W`` times its
    bytes, and the lookups of the rank's own ``B/W`` samples.

The estimates rank placements against each other; they do not predict wall-clock time.
"""

from __future__ import annotations

import dataclasses
import enum

from engine.config.sharding import ShardingType
from engine.errors import ConfigError
from trainer.topology import Topology

__all__ = ["DType", "TableStats", "StepShape", "ShardCost", "shard_cost", "table_bytes"]

_ID_BYTES = 8


class DType(enum.Enum):
    """Storage type of embedding rows; the value is bytes per element."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def nbytes(self) -> int:
        return 4 if self is DType.FP32 else 2


@dataclasses.dataclass(frozen=True)
class TableStats:
    """What the planner knows about one table.

    ``pooling_factor``: mean ids per sample when the feature is present (1 for single-valued
    features); ``access_frequency``: fraction of samples carrying the feature (0..1];
    ``cache_hit_rate``: measured row-cache hit rate, None = estimate ``cache_rows / rows``
    (uniform access, the pessimistic case). The cache's statistics fill these in when known.
    """

    name: str
    rows: int
    dim: int
    dtype: DType = DType.FP32
    pooling_factor: float = 1.0
    access_frequency: float = 1.0
    cache_hit_rate: float | None = None

    def __post_init__(self):
        if self.rows < 1 or self.dim < 1:
            raise ConfigError(f"table {self.name!r}: rows and dim must be >= 1, got {self.rows} x {self.dim}")
        if self.pooling_factor <= 0:
            raise ConfigError(f"table {self.name!r}: pooling_factor must be > 0, got {self.pooling_factor}")
        if not 0.0 < self.access_frequency <= 1.0:
            raise ConfigError(
                f"table {self.name!r}: access_frequency must be in (0, 1], got {self.access_frequency}"
            )
        if self.cache_hit_rate is not None and not 0.0 <= self.cache_hit_rate <= 1.0:
            raise ConfigError(f"table {self.name!r}: cache_hit_rate must be in [0, 1]")

    @property
    def lookups_per_sample(self) -> float:
        return self.pooling_factor * self.access_frequency


@dataclasses.dataclass(frozen=True)
class StepShape:
    """The per-step workload: global batch, optimizer state slots per element, wire size."""

    global_batch_size: int
    optimizer_slots: int = 1
    comm_bytes_per_element: int = 4
    # model-parallel shards take sparse gradients (Adagrad/SGD): the optimizer touches only
    # the rows a step looked up, not the whole shard
    sparse_updates: bool = False

    def __post_init__(self):
        if self.global_batch_size < 1:
            raise ConfigError(f"global batch size must be >= 1, got {self.global_batch_size}")
        if self.optimizer_slots < 0 or self.comm_bytes_per_element not in (2, 4):
            raise ConfigError("optimizer_slots must be >= 0 and comm_bytes_per_element 2 or 4")


@dataclasses.dataclass(frozen=True)
class ShardCost:
    """One shard's footprint on its rank: bytes and estimated seconds per step."""

    device_bytes: int
    host_bytes: int
    compute_s: float
    comm_s: float

    @property
    def step_s(self) -> float:
        return self.compute_s + self.comm_s


def table_bytes(t: TableStats, shape: StepShape) -> int:
    """Weights, gradient and optimizer state of the whole table (no step buffers)."""
    return t.rows * t.dim * _bytes_per_element(t, shape)


def _bytes_per_element(t: TableStats, shape: StepShape) -> int:
    return 2 * t.dtype.nbytes + 4 * shape.optimizer_slots


def shard_cost(t: TableStats, sharding: ShardingType, rows: int, cols: int, num_shards: int,
               topo: Topology, shape: StepShape, *, group: tuple[int, ...] | None = None,
               cache_rows: int | None = None) -> ShardCost:
    """Cost of one shard of ``rows x cols`` of ``t`` among ``num_shards`` shards of the table.

    ``group``: the ranks the table's shards live on (row-wise within one host); None = all.
    ``cache_rows``: a cached placement keeping this many rows on the device.
    """
    W = topo.world_size
    B = shape.global_batch_size
    per_elem = _bytes_per_element(t, shape)
    lookups = B * t.lookups_per_sample
    a2a_bw = topo.exchange_bw_bytes_per_s()
    cross = (W - 1) / W

    if sharding is ShardingType.DATA_PARALLEL:
        local_ids = lookups / W
        buffers = int(local_ids * _ID_BYTES + 2 * (B / W) * cols * 4)
        compute = (3 * local_ids * cols * t.dtype.nbytes
                   + rows * cols * (2 * t.dtype.nbytes + 8 * shape.optimizer_slots)) / topo.device_bw_bytes_per_s
        comm = 2 * cross * rows * cols * t.dtype.nbytes / a2a_bw
        return ShardCost(rows * cols * per_elem + buffers, 0, compute, comm)

    # Row-wise shards see their share of the ids; table- and column-wise see all of them.
    row_split = sharding in (ShardingType.ROW_WISE, ShardingType.TABLE_ROW_WISE)
    ids = lookups / num_shards if row_split else lookups
    buffers = int(ids * _ID_BYTES + 2 * B * cols * 4)
    bag_bytes = 3 * ids * cols * t.dtype.nbytes
    out_bytes = 2 * B * cols * shape.comm_bytes_per_element  # forward out + gradient back
    comm = (cross * ids * _ID_BYTES + cross * out_bytes) / a2a_bw
    if sharding is ShardingType.TABLE_ROW_WISE and group is not None:
        # Partial sums meet inside the host first (fast links), then one B x cols block per
        # host crosses the network: the intra-host part replaces a share of the slow traffic.
        comm = (cross * ids * _ID_BYTES + cross * out_bytes / len(group)) / a2a_bw \
            + out_bytes / topo.exchange_bw_bytes_per_s(group)

    if cache_rows is None:
        device = rows * cols * per_elem + buffers
        touched = min(rows, ids) if shape.sparse_updates else rows
        update = touched * cols * (2 * t.dtype.nbytes + 8 * shape.optimizer_slots)
        compute = (bag_bytes + update) / topo.device_bw_bytes_per_s
        return ShardCost(device, 0, compute, comm)

    cached = min(cache_rows, rows)
    hit = t.cache_hit_rate if t.cache_hit_rate is not None else cached / rows
    device = cached * cols * per_elem + buffers
    host = rows * cols * (t.dtype.nbytes + 4 * shape.optimizer_slots)
    # a miss brings the row and its optimizer state in and writes an evicted one back
    miss_bytes = 2 * ids * (1.0 - hit) * cols * (t.dtype.nbytes + 4 * shape.optimizer_slots)
    # the cache updates only the rows it touched (sparse_step), not the whole table
    compute = (bag_bytes / topo.device_bw_bytes_per_s
               + ids * cols * (2 * t.dtype.nbytes + 8 * shape.optimizer_slots) / topo.device_bw_bytes_per_s
               + miss_bytes / topo.host_to_device_bw_bytes_per_s)
    return ShardCost(device, host, compute, comm)
