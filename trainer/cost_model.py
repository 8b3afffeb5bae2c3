"""Per-shard memory and time estimates for the sharding planner. Pure arithmetic, no torch.

What one training step costs a rank that holds a shard of ``rows x cols`` of a table, for a
global batch of ``B`` samples (``W`` ranks, ``L`` = lookups per sample of the table):

memory (device)
    A model-parallel shard is what ``trainer.fused_embedding`` holds: its weights
    (``elem`` bytes per element, the embedding dtype) and the sparse optimizer's fp32 state
    (``optimizer_state_bytes_per_row``: 4 bytes per row for row-wise Adagrad, 4 per element
    for Adagrad, 8 for Adam, none for SGD); no dense gradient. Step buffers: the ids it
    receives (8 bytes each), its pooled output and that output's gradient (fp32,
    ``B x cols``) and the deduplicated row gradients (fp32, at most ``ids x cols``).
    A data-parallel replica is a fused table on every rank (``trainer.sharded_embedding``):
    weights and sparse optimizer state like a shard, plus the step's dense fp32 gradient
    buffer of ``rows x (cols + 1)`` (the gradient and a touched flag per row) that is
    all-reduced so every rank applies the same update.
    A *cached* shard keeps only ``cache_rows`` rows and their state on the device; the full
    table with its state lives in host memory (and on SSD behind it).
compute
    embedding-bag forward and backward read/write ``ids x cols x elem`` bytes, and the
    sparse optimizer reads and writes the touched rows and their state (at most ``ids``
    rows) at device bandwidth; a replica also zeroes, fills and reads its dense gradient
    buffer. A cached shard pays its misses at host-to-device bandwidth.
communication
    model-parallel shards: the ids in (8 bytes each), the pooled output out and its
    gradient back (``B x cols x comm`` bytes each way, where ``comm`` is the wire element
    size), a fraction ``(W-1)/W`` of which crosses the network. Row-wise shards send full
    ``B x cols`` partial sums, which is why row-wise costs more traffic than table-wise.
    Data-parallel replicas: a ring all-reduce of the dense gradient buffer, ``2 (W-1)/W``
    times its bytes, and the lookups of the rank's own ``B/W`` samples.

The estimates rank placements against each other; they do not predict wall-clock time.
"""

from __future__ import annotations

import dataclasses
import enum

from trainer.config import ShardingType, SparseOptimizerKind
from trainer.errors import TrainerConfigError
from trainer.topology import Topology

__all__ = [
    "DType", "TableStats", "StepShape", "ShardCost", "shard_cost", "table_bytes",
    "optimizer_state_bytes_per_row",
]

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
            raise TrainerConfigError(f"table {self.name!r}: rows and dim must be >= 1, got {self.rows} x {self.dim}")
        if self.pooling_factor <= 0:
            raise TrainerConfigError(f"table {self.name!r}: pooling_factor must be > 0, got {self.pooling_factor}")
        if not 0.0 < self.access_frequency <= 1.0:
            raise TrainerConfigError(
                f"table {self.name!r}: access_frequency must be in (0, 1], got {self.access_frequency}"
            )
        if self.cache_hit_rate is not None and not 0.0 <= self.cache_hit_rate <= 1.0:
            raise TrainerConfigError(f"table {self.name!r}: cache_hit_rate must be in [0, 1]")

    @property
    def lookups_per_sample(self) -> float:
        return self.pooling_factor * self.access_frequency


def optimizer_state_bytes_per_row(kind: SparseOptimizerKind, dim: int) -> int:
    """fp32 state bytes the sparse optimizer keeps beside one row of ``dim`` columns (the
    shapes of ``trainer.sparse_optim.state_shapes``, which a test keeps in step)."""
    return {SparseOptimizerKind.ROWWISE_ADAGRAD: 4, SparseOptimizerKind.SGD: 0,
            SparseOptimizerKind.ADAGRAD: 4 * dim, SparseOptimizerKind.ADAM: 8 * dim}[kind]


@dataclasses.dataclass(frozen=True)
class StepShape:
    """The per-step workload: global batch, the embeddings' sparse optimizer, wire size."""

    global_batch_size: int
    sparse_optimizer: SparseOptimizerKind = SparseOptimizerKind.ROWWISE_ADAGRAD
    comm_bytes_per_element: int = 4

    def __post_init__(self):
        if self.global_batch_size < 1:
            raise TrainerConfigError(f"global batch size must be >= 1, got {self.global_batch_size}")
        if self.comm_bytes_per_element not in (2, 4):
            raise TrainerConfigError("comm_bytes_per_element must be 2 or 4")


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
    """Weights and sparse optimizer state of the whole table (no step buffers)."""
    return t.rows * _row_bytes(t, t.dim, shape)


def _row_bytes(t: TableStats, cols: int, shape: StepShape) -> int:
    """Device bytes of one row of ``cols`` columns of a model-parallel or cached shard."""
    return cols * t.dtype.nbytes + optimizer_state_bytes_per_row(shape.sparse_optimizer, cols)




def shard_cost(t: TableStats, sharding: ShardingType, rows: int, cols: int, num_shards: int,
               topo: Topology, shape: StepShape, *, group: tuple[int, ...] | None = None,
               cache_rows: int | None = None) -> ShardCost:
    """Cost of one shard of ``rows x cols`` of ``t`` among ``num_shards`` shards of the table.

    ``group``: the ranks the table's shards live on (row-wise within one host); None = all.
    ``cache_rows``: a cached placement keeping this many rows on the device.
    """
    W = topo.world_size
    B = shape.global_batch_size
    row_bytes = _row_bytes(t, cols, shape)
    lookups = B * t.lookups_per_sample
    a2a_bw = topo.exchange_bw_bytes_per_s()
    cross = (W - 1) / W

    if sharding is ShardingType.DATA_PARALLEL:
        local_ids = lookups / W
        buffers = int(local_ids * _ID_BYTES + 2 * (B / W) * cols * 4)
        grad_buffer = rows * (cols + 1) * 4
        touched = min(rows, lookups)
        compute = (3 * local_ids * cols * t.dtype.nbytes + 3 * grad_buffer
                   + 2 * touched * row_bytes) / topo.device_bw_bytes_per_s
        comm = 2 * cross * grad_buffer / a2a_bw
        return ShardCost(rows * row_bytes + grad_buffer + buffers, 0, compute, comm)

    # Row-wise shards see their share of the ids; table- and column-wise see all of them.
    row_split = sharding in (ShardingType.ROW_WISE, ShardingType.TABLE_ROW_WISE)
    ids = lookups / num_shards if row_split else lookups
    # ids in, pooled output and its gradient, deduplicated row gradients (at most one per id)
    buffers = int(ids * _ID_BYTES + 2 * B * cols * 4 + min(rows, ids) * cols * 4)
    bag_bytes = 3 * ids * cols * t.dtype.nbytes
    out_bytes = 2 * B * cols * shape.comm_bytes_per_element  # forward out + gradient back
    comm = (cross * ids * _ID_BYTES + cross * out_bytes) / a2a_bw
    if sharding is ShardingType.TABLE_ROW_WISE and group is not None:
        # Partial sums meet inside the host first (fast links), then one B x cols block per
        # host crosses the network: the intra-host part replaces a share of the slow traffic.
        comm = (cross * ids * _ID_BYTES + cross * out_bytes / len(group)) / a2a_bw \
            + out_bytes / topo.exchange_bw_bytes_per_s(group)

    # the sparse optimizer reads and writes the touched rows and their state, nothing else
    update = 2 * min(rows, ids) * row_bytes
    if cache_rows is None:
        compute = (bag_bytes + update) / topo.device_bw_bytes_per_s
        return ShardCost(rows * row_bytes + buffers, 0, compute, comm)

    cached = min(cache_rows, rows)
    hit = t.cache_hit_rate if t.cache_hit_rate is not None else cached / rows
    # a miss brings the row and its optimizer state in and writes an evicted one back
    miss_bytes = 2 * ids * (1.0 - hit) * row_bytes
    compute = ((bag_bytes + update) / topo.device_bw_bytes_per_s
               + miss_bytes / topo.host_to_device_bw_bytes_per_s)
    return ShardCost(cached * row_bytes + buffers, rows * row_bytes, compute, comm)
