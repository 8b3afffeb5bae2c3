"""One TOML file -> one frozen, typed, validated config tree.

Each section is declared by the package that uses it (``streams.config``,
``transforms.config``, ``storage.config``, ``trainer.config``, ``engine.config.pipeline``,
``engine.config.metrics``, ``engine.config.export``);
this module composes them into ``HeadraceConfig`` and loads it from TOML.

Example:
    >>> from engine.config import config_from_dict
    >>> cfg = config_from_dict({"schema": {"dense": [{"name": "x"}]}})
    >>> cfg.schema.dense[0].name
    'x'

Unknown keys and wrong types raise ``engine.errors.ConfigError`` naming the key and file.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import tomllib

from engine.config._loader import ConfigContext, build_section
from engine.config.export import ExportConfig
from engine.config.metrics import MetricsConfig
from engine.config.pipeline import PipelineConfig, RunnerKind
from engine.errors import ConfigError
from storage.config import CacheConfig, CacheDurability
from streams.config import KafkaClientKind, SourceConfig, SourceKind, StartPosition
from trainer.config import (
    CommPrecision,
    CrossStructure,
    DeviceKind,
    Interaction,
    ModelConfig,
    ModelKind,
    OptimizerKind,
    RowCacheConfig,
    RowCachePolicy,
    RowOptimizerKind,
    ShardingConfig,
    ShardingType,
    TrainerConfig,
    TrainSpec,
)
from transforms.config import (
    DenseFeature,
    EventFormat,
    FilterConfig,
    FitKind,
    HashConfig,
    SchemaConfig,
    SparseFeature,
    SparseType,
)

__all__ = [
    "HeadraceConfig", "load_config", "config_from_dict", "replace_in",
    "SourceConfig", "SourceKind", "KafkaClientKind", "StartPosition",
    "SchemaConfig", "EventFormat", "DenseFeature", "SparseFeature", "SparseType",
    "FilterConfig", "PipelineConfig", "RunnerKind", "CacheConfig", "CacheDurability", "TrainerConfig",
    "OptimizerKind", "HashConfig", "FitKind", "ShardingConfig", "ShardingType", "DeviceKind",
    "CommPrecision", "RowCacheConfig", "RowCachePolicy", "RowOptimizerKind", "MetricsConfig",
    "ModelConfig", "ModelKind", "CrossStructure", "Interaction", "ExportConfig",
]


@dataclasses.dataclass(frozen=True)
class HeadraceConfig:
    source: SourceConfig = SourceConfig()
    schema: SchemaConfig = dataclasses.field(default_factory=lambda: SchemaConfig(dense=(DenseFeature("x"),)))
    filter: FilterConfig = FilterConfig()
    pipeline: PipelineConfig = PipelineConfig()
    cache: CacheConfig = CacheConfig()
    trainer: TrainerConfig = TrainerConfig()
    hash: HashConfig = HashConfig()
    sharding: ShardingConfig = ShardingConfig()
    row_cache: RowCacheConfig = RowCacheConfig()
    metrics: MetricsConfig = MetricsConfig()
    model: ModelConfig = ModelConfig()
    export: ExportConfig = ExportConfig()

    def __post_init__(self):
        for s in self.schema.sparse:
            if s.dim and s.dim != self.trainer.embedding_dim:
                raise ValueError(
                    f"schema.sparse {s.name!r}: dim {s.dim} differs from trainer.embedding_dim "
                    f"{self.trainer.embedding_dim}; the dot interaction needs one dim"
                )

    def train_spec(self) -> TrainSpec:
        """The sections the trainer reads (``trainer.config.TrainSpec``)."""
        return TrainSpec(schema=self.schema, trainer=self.trainer, sharding=self.sharding,
                         row_cache=self.row_cache, cache=self.cache, model=self.model)


def config_from_dict(data: dict[str, Any], file: str = "<dict>") -> HeadraceConfig:
    """Build and validate the config tree from a parsed TOML document."""
    return build_section(HeadraceConfig, data, ConfigContext(file=file, path=""))


def load_config(path: str | os.PathLike[str]) -> HeadraceConfig:
    """Load, validate and freeze a TOML config file. Relative paths stay as written
    (they are resolved against the working directory by the components that use them)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return config_from_dict(data, file=path)


def replace_in(cfg: HeadraceConfig, section: str, **changes: Any) -> HeadraceConfig:
    """Return ``cfg`` with fields of one section replaced (e.g. CLI overrides)."""
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})
