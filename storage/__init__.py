"""Everything that touches LMDB or SSD files: the batch cache with its source offsets,
dead letters, id statistics, the embedding row store and checkpoint files.
Only this package imports ``lmdb``."""

__all__ = ["batch_cache", "dead_letters", "atomic"]
