"""Config sections owned by ``trainer``: [trainer] (model shape, optimizer, loop), [model]
(the model kind on top of the embeddings and its first-order part, ``ModelConfig``),
[sharding] (how tables are placed across devices, ``trainer.planner``) and [row_cache]
(SSD-backed rows behind a device cache, ``trainer.cached_embedding``).

Sections are frozen dataclasses that validate themselves in ``__post_init__`` (raising
``ValueError``); ``engine.config`` loads them from TOML and names the key and file on error.

[sharding] — how embedding tables are placed across devices (trainer.planner).

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

[row_cache] — SSD-backed embedding rows with a device/DRAM cache.

When ``enabled``, the tables named in ``tables`` (all sparse features when empty) keep every
row and its row-wise optimizer state in ``storage.row_store.RowStore`` files under ``path``
and train through ``trainer.cached_embedding.CachedEmbeddingBagCollection``, which holds at
most ``cache_rows`` rows of each table (or as many as fit in ``cache_bytes``) on the
trainer's device.

Example:
    >>> RowCacheConfig(enabled=True, cache_rows=4096).policy
    <RowCachePolicy.LRU: 'lru'>
"""

from __future__ import annotations

import dataclasses
import enum

from storage.config import CacheConfig
from storage.metrics_history import MIN_MAX_BYTES
from transforms.config import SchemaConfig
from trainer.batch_ramp import DEFAULT_RAMP_SAMPLES, DEFAULT_RAMP_START, BatchRamp

__all__ = [
    "TrainSpec",
    "OptimizerKind", "SparseOptimizerKind", "Accumulator", "Precision", "EmbeddingDtype", "TrainerConfig",
    "ShardingConfig", "ShardingType", "DeviceKind", "CommPrecision",
    "RowCacheConfig", "RowCachePolicy", "RowOptimizerKind",
    "ModelKind", "CrossStructure", "Interaction", "ModelConfig",
]


class OptimizerKind(enum.Enum):
    """A torch optimizer for the dense layers (and, through ``optimizer``, the old single key)."""

    ADAGRAD = "adagrad"
    SGD = "sgd"
    ADAM = "adam"


class SparseOptimizerKind(enum.Enum):
    """The update fused embedding tables apply to the rows a batch touched (trainer.sparse_optim)."""

    ROWWISE_ADAGRAD = "rowwise_adagrad"  # one fp32 accumulator per row (FBGEMM's default)
    SGD = "sgd"
    ADAGRAD = "adagrad"  # element-wise, as torch.optim.Adagrad
    ADAM = "adam"  # lazy, as torch.optim.SparseAdam


class Accumulator(enum.Enum):
    """What row-wise Adagrad adds to a row's accumulator each step (trainer.sparse_optim)."""

    BATCH = "batch"  # the squared batch gradient of the row (FBGEMM's update)
    # the sum of the row's squared per-lookup gradients: online per-coordinate Adagrad's
    # step sizes for 1-wide rows (README "Tuning")
    PER_LOOKUP = "per_lookup"


class Precision(enum.Enum):
    """Arithmetic of the MLPs and the interaction. ``tf32``: fp32 storage, TF32 tensor-core
    matmuls on CUDA (the same as fp32 on a CPU); ``bf16``: autocast to bfloat16."""

    FP32 = "fp32"
    TF32 = "tf32"
    BF16 = "bf16"


class EmbeddingDtype(enum.Enum):
    """Storage type of embedding rows; optimizer state stays fp32, and 16-bit rows are
    written back with stochastic rounding."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    embedding_dim: int = 16
    bottom_mlp: tuple[int, ...] = (64, 16)  # last size must equal embedding_dim
    top_mlp: tuple[int, ...] = (32,)  # a final 1-unit logit layer is added (was (64, 32): README "Tuning")
    batch_size: int = 512
    # Embeddings and dense layers train with their own optimizer and learning rate. The
    # single keys of earlier releases still work: ``optimizer`` sets both kinds (the sparse
    # one by the same name) and ``learning_rate`` both rates, unless the specific key is set.
    sparse_optimizer: SparseOptimizerKind | None = None  # None: rowwise_adagrad
    sparse_learning_rate: float | None = None  # None: learning_rate
    # Row-wise Adagrad's accumulator (Accumulator): "batch" or "per_lookup". The first-order
    # rows use [model] first_order_accumulator instead.
    sparse_accumulator: Accumulator = Accumulator.BATCH
    dense_optimizer: OptimizerKind | None = None  # None: adagrad
    dense_learning_rate: float | None = None  # None: learning_rate
    learning_rate: float = 0.05
    optimizer: OptimizerKind | None = None
    precision: Precision = Precision.TF32
    embedding_dtype: EmbeddingDtype = EmbeddingDtype.FP32
    checkpoint_dir: str = "./headrace-data/checkpoints"
    checkpoint_every_batches: int = 200
    # Snapshot periodic checkpoints and write them on a background thread while training goes
    # on (trainer.checkpoint_writer); the final one is always written in the foreground.
    checkpoint_background: bool = True
    metrics_window: int = 50_000  # samples in the recent-window metrics
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    prefetch_batches: int = 4
    # torch intra-op threads for the trainer; 0 = torch's default (all cores). serve runs
    # the pipeline beside the trainer, and oversubscribed cores slow steps ~10x (measured).
    threads: int = 0
    # Following the cache, train a partial batch once its first row has waited this long
    # (the cut is recorded in the cache, so resume stays exact); 0 = cut only full batches.
    max_batch_wait_ms: int = 0
    # Stable training: both learning rates ramp linearly from lr/warmup_steps to lr over the
    # first warmup_steps steps (0 = off); the dense layers' gradient is clipped to this L2
    # norm before their step (0 = off). Embedding rows are not clipped (see README "Stable
    # training": row-wise Adagrad's step does not grow with the gradient).
    warmup_steps: int = 20
    clip_grad_norm: float = 0.0
    # Small steps first (trainer.batch_ramp): the first samples train in steps of
    # batch_ramp_start rows, doubling after every batch_ramp_samples samples until a step is
    # the whole batch (0 = off: every step is a batch). Measured: README "Tuning".
    batch_ramp_start: int = DEFAULT_RAMP_START
    batch_ramp_samples: int = DEFAULT_RAMP_SAMPLES
    # Metrics history beside the checkpoints (checkpoint_dir/metrics-history.jsonl, read by
    # headrace report): a record every history_every_s seconds of training (0 = at every
    # progress report), the file thinned oldest-first to stay under history_max_bytes.
    history_every_s: float = 10.0
    history_max_bytes: int = 16 << 20
    # Also write those scalars as TensorBoard events here ("" = off; needs the `report` extra);
    # its event files share the history_max_bytes budget.
    tensorboard_dir: str = ""
    # Read training batches from these Arrow Flight feeds (`headrace feed` on the ingest
    # hosts: "grpc://host:port" or "grpc+tls://host:port") instead of cache.path, merged
    # round-robin by batch in this order (trainer.feed_reader); [] = the local cache.
    feeds: tuple[str, ...] = ()
    # The environment variable holding the bearer token the feeds expect ("" = none).
    feed_token_env: str = ""
    # PEM file of the CA that signed grpc+tls feeds' certificates ("" = the system's roots).
    feed_tls_root_certs: str = ""
    # How long an unreachable feed is retried (resuming from the cursor) before failing.
    feed_retry_s: float = 60.0

    def __post_init__(self):
        if self.embedding_dim < 1:
            raise ValueError("embedding_dim must be >= 1")
        if self.bottom_mlp and self.bottom_mlp[-1] != self.embedding_dim:
            raise ValueError(
                f"bottom_mlp must end in embedding_dim ({self.embedding_dim}) so dense and sparse "
                f"vectors interact; got {list(self.bottom_mlp)}"
            )
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        for name in ("learning_rate", "sparse_learning_rate", "dense_learning_rate"):
            lr = getattr(self, name)
            if lr is not None and not 0 < lr < float("inf"):
                raise ValueError(f"{name} must be a finite number > 0, got {lr}")
        if self.threads < 0:
            raise ValueError("threads must be >= 0 (0 = torch default)")
        if self.checkpoint_every_batches < 1:
            raise ValueError("checkpoint_every_batches must be >= 1")
        if not 0 <= self.history_every_s < float("inf"):
            raise ValueError(f"history_every_s must be a finite number >= 0 (0 = every progress report), "
                             f"got {self.history_every_s}")
        if self.history_max_bytes < MIN_MAX_BYTES:
            raise ValueError(f"history_max_bytes must be >= {MIN_MAX_BYTES} (64 KiB: a few hundred records), "
                             f"got {self.history_max_bytes}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0 (0 = no warmup), got {self.warmup_steps}")
        if not 0 <= self.clip_grad_norm < float("inf"):
            raise ValueError(f"clip_grad_norm must be a finite number >= 0 (0 = no clipping), "
                             f"got {self.clip_grad_norm}")
        BatchRamp(self.batch_ramp_start, self.batch_ramp_samples)  # raises naming the key
        if self.max_batch_wait_ms < 0:
            raise ValueError(f"max_batch_wait_ms must be >= 0 (0 = train full batches only), "
                             f"got {self.max_batch_wait_ms}")
        _check_feeds(self)

    @property
    def sparse_optimizer_kind(self) -> SparseOptimizerKind:
        """The embeddings' optimizer: ``sparse_optimizer``, else the one named by the old
        ``optimizer`` key, else row-wise Adagrad."""
        if self.sparse_optimizer is not None:
            return self.sparse_optimizer
        if self.optimizer is not None:
            return SparseOptimizerKind(self.optimizer.value)
        return SparseOptimizerKind.ROWWISE_ADAGRAD

    @property
    def dense_optimizer_kind(self) -> OptimizerKind:
        """The dense layers' optimizer: ``dense_optimizer``, else ``optimizer``, else Adagrad."""
        return self.dense_optimizer or self.optimizer or OptimizerKind.ADAGRAD

    @property
    def sparse_lr(self) -> float:
        return self.sparse_learning_rate if self.sparse_learning_rate is not None else self.learning_rate

    @property
    def dense_lr(self) -> float:
        return self.dense_learning_rate if self.dense_learning_rate is not None else self.learning_rate


class ModelKind(enum.Enum):
    """What sits on top of the embeddings ([model] kind; trainer.model.build_model)."""

    DLRM = "dlrm"  # pairwise dot interaction + top MLP (trainer.model.DLRM)
    DCN_V2 = "dcn_v2"  # cross network + deep MLP (trainer.dcn.DCNv2)
    LINEAR = "linear"  # the first-order part alone: online logistic regression (trainer.linear_model)


class CrossStructure(enum.Enum):
    """How DCN-V2 combines its cross network and deep MLP (Wang et al. 2021, figure 2)."""

    STACKED = "stacked"  # x0 -> cross layers -> deep MLP -> logit
    PARALLEL = "parallel"  # [cross(x0), deep(x0)] -> logit


class Interaction(enum.Enum):
    """What DLRM's top MLP reads beside the dense vector ([model] interaction; trainer.model.DLRM)."""

    DOT = "dot"  # the pairwise dot products: the reference DLRM
    DOT_CONCAT = "dot_concat"  # the dot products and the pooled embeddings themselves


# Default first-order learning rates (per-lookup accumulator), measured with
# bench/quality.py on both of its streams (README "Tuning").
LINEAR_FIRST_ORDER_LR = 0.12
WIDE_FIRST_ORDER_LR = 0.07


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """[model]: the model kind and its own knobs (shapes of the dense vector, MLPs and
    embeddings stay in [trainer]).

    ``wide``: a first-order part added to every kind's logit: a learned weight per id of every
    sparse feature (1-wide embedding rows, the same rows as the feature's table, trained by the
    sparse optimizer) plus a linear term on the dense features (trainer.first_order).
    ``linear`` is that part alone, whatever ``wide`` says.

    Example:
        >>> ModelConfig(kind=ModelKind.DCN_V2, cross_rank=8).cross_layers
        3
    """

    kind: ModelKind = ModelKind.DLRM
    wide: bool = True
    # Standardise the dense features online (running mean and variance of the samples seen so
    # far) before any layer sees them: raw units (seconds, prices) otherwise blow up the first
    # steps (trainer.dense_norm).
    normalize_dense: bool = True
    # Learning rate of the whole first-order part (its 1-wide rows under [trainer]
    # sparse_optimizer, its dense weights and bias under dense_optimizer); None = the kind's
    # default (first_order_lr): alone (linear) the part carries the whole signal and wants a
    # larger rate than beside a deep part (README "Tuning").
    first_order_learning_rate: float | None = None
    # Row-wise Adagrad accumulator of the first-order rows (Accumulator; replaces [trainer]
    # sparse_accumulator for them): "per_lookup" tracks online logistic regression's step sizes.
    first_order_accumulator: Accumulator = Accumulator.PER_LOOKUP
    # dlrm: what the top MLP reads beside the dense vector (Interaction). "dot_concat" adds the
    # pooled embeddings to the pairwise dots: a path linear in the embeddings, which learns
    # faster early in a stream than the dots alone (measured in README "Tuning").
    interaction: Interaction = Interaction.DOT_CONCAT
    cross_layers: int = 3  # dcn_v2: cross layers
    cross_rank: int = 0  # dcn_v2: 0 = full-rank W; r > 0 = low-rank U V^T with inner size r
    cross_structure: CrossStructure = CrossStructure.STACKED

    def __post_init__(self):
        if self.cross_layers < 1:
            raise ValueError(f"cross_layers must be >= 1, got {self.cross_layers}")
        if self.cross_rank < 0:
            raise ValueError(f"cross_rank must be >= 0 (0 = full rank), got {self.cross_rank}")
        lr = self.first_order_learning_rate
        if lr is not None and not 0 < lr < float("inf"):
            raise ValueError(f"first_order_learning_rate must be a finite number > 0, got {lr}")

    @property
    def first_order_lr(self) -> float:
        """The first-order part's learning rate: ``first_order_learning_rate``, else
        ``LINEAR_FIRST_ORDER_LR`` for the linear kind and ``WIDE_FIRST_ORDER_LR`` beside a
        deep part."""
        if self.first_order_learning_rate is not None:
            return self.first_order_learning_rate
        return LINEAR_FIRST_ORDER_LR if self.kind is ModelKind.LINEAR else WIDE_FIRST_ORDER_LR

    @property
    def has_first_order(self) -> bool:
        """Whether the model has the first-order part (``wide``, or the linear kind)."""
        return self.wide or self.kind is ModelKind.LINEAR

    @property
    def has_embeddings(self) -> bool:
        """Whether the model has ``embedding_dim``-wide embeddings (every kind but linear)."""
        return self.kind is not ModelKind.LINEAR


_FEED_SCHEMES = ("grpc", "grpc+tcp", "grpc+tls")


def _check_feeds(t: TrainerConfig) -> None:
    """[trainer] feeds: URLs a Flight client can dial, each once, and no setting that needs
    the local cache."""
    for url in t.feeds:
        scheme, sep, rest = url.partition("://")
        host, colon, port = rest.rpartition(":")
        if not sep or scheme not in _FEED_SCHEMES or not colon or not host or not port.isdigit():
            raise ValueError(f"feeds: {url!r} is not a feed URL; expected grpc://HOST:PORT (or "
                             "grpc+tls://HOST:PORT), the address `headrace feed` prints")
    if len(set(t.feeds)) != len(t.feeds):
        raise ValueError(f"feeds lists a feed twice: {list(t.feeds)} (its batches would be trained twice)")
    if t.feeds and t.max_batch_wait_ms > 0:
        raise ValueError(f"max_batch_wait_ms = {t.max_batch_wait_ms} records timed cuts in the local cache; "
                         "a trainer reading feeds cuts full batches only: set it to 0")
    if not 0 < t.feed_retry_s < float("inf"):
        raise ValueError(f"feed_retry_s must be a finite number > 0, got {t.feed_retry_s}")


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


class RowCachePolicy(enum.Enum):
    """Which cached row is evicted when a miss needs a slot."""

    LRU = "lru"  # least recently used
    LFU = "lfu"  # least frequently used while cached; ties broken by recency


class RowOptimizerKind(enum.Enum):
    """Update applied to cached rows; its state lives beside each row on SSD."""

    ROWWISE_ADAGRAD = "rowwise_adagrad"  # one accumulator per row: mean of squared grads
    SGD = "sgd"


@dataclasses.dataclass(frozen=True)
class RowCacheConfig:
    enabled: bool = False
    # Directory of the row store (one memory-mapped file per table, a manifest, undo logs).
    path: str = "./headrace-data/rows"
    # Cached rows per table on the device; 0 = derive from cache_bytes.
    cache_rows: int = 0
    # Device bytes per table for rows and their optimizer state, used when cache_rows = 0.
    cache_bytes: int = 64 << 20
    policy: RowCachePolicy = RowCachePolicy.LRU
    optimizer: RowOptimizerKind = RowOptimizerKind.ROWWISE_ADAGRAD
    # Added to sqrt(accumulator) in the row-wise Adagrad denominator.
    adagrad_eps: float = 1e-8
    # Read the next batch's missing rows in a background thread during the current step.
    prefetch: bool = True
    # fdatasync undo records before the rows they protect are overwritten, and the rows at
    # each checkpoint: survives power loss, not just a killed process (about 0.3 ms a step).
    fsync: bool = True
    # Features whose tables are cached; empty = every [[schema.sparse]] feature.
    tables: tuple[str, ...] = ()

    def __post_init__(self):
        if self.cache_rows < 0:
            raise ValueError(f"cache_rows must be >= 0 (0 = use cache_bytes), got {self.cache_rows}")
        if self.cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {self.cache_bytes}")
        if self.enabled and self.cache_rows == 0 and self.cache_bytes == 0:
            raise ValueError("set cache_rows or cache_bytes to a positive size (both are 0)")
        if not self.adagrad_eps > 0:
            raise ValueError(f"adagrad_eps must be > 0, got {self.adagrad_eps}")
        if not self.path:
            raise ValueError("path must name the row store directory")
        if len(set(self.tables)) != len(self.tables):
            raise ValueError(f"tables lists a feature twice: {list(self.tables)}")

    def cache_rows_for(self, row_bytes: int) -> int:
        """Rows of one table the cache holds, given the device bytes of one cached row
        (weights plus optimizer state)."""
        if self.cache_rows:
            return self.cache_rows
        return max(1, self.cache_bytes // max(1, row_bytes))


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """Everything the trainer reads from config: the schema (which features, how many rows),
    its own sections, and the cache it trains from. ``engine`` builds one from the whole
    config tree (``HeadraceConfig.train_spec()``); code that uses the trainer without the
    engine builds one directly. Trainer functions read only these six attributes, so any
    object that has them (the engine's tree included) is accepted.

    Example:
        >>> from transforms.config import SchemaConfig, SparseFeature
        >>> spec = TrainSpec(schema=SchemaConfig(sparse=(SparseFeature("u", rows=10),)))
        >>> spec.trainer.embedding_dim
        16
    """

    schema: SchemaConfig
    trainer: TrainerConfig = TrainerConfig()
    sharding: ShardingConfig = ShardingConfig()
    row_cache: RowCacheConfig = RowCacheConfig()
    cache: CacheConfig = CacheConfig()
    model: ModelConfig = ModelConfig()
