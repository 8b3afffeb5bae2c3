"""Everything that touches LMDB or SSD files: the batch cache with its source offsets,
dead letters, id statistics, the id-mapping store, the embedding row store and checkpoint
files (all whole-file writes go through ``atomic``). Only this package imports ``lmdb``."""

__all__ = [
    "batch_cache",
    "cache_reader",
    "admission",
    "retention",
    "cache_keys",
    "dead_letters",
    "lmdb_env",
    "id_stats",
    "mapping_store",
    "migration_stats",
    "metrics_history",
    "row_store",
    "row_store_format",
    "row_store_snapshot",
    "model_package",
    "atomic",
    "disk_space",
    "config",
    "errors",
    "feed_wire",
]
