"""The model side: DLRM, embedding collections (plain, sharded, SSD-cached), the sharding
planner, progressive metrics, the continuous training loop and checkpoints."""

__all__ = ["batch", "embedding", "model", "metrics", "data", "loop", "checkpoint"]
