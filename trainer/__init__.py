"""The model side: DLRM, embedding collections (plain, sharded, SSD-cached), the sharding
planner, progressive metrics, the continuous training loop and checkpoints."""

__all__ = [
    "batch",
    "embedding",
    "model",
    "metrics",
    "data",
    "optim",
    "device",
    "loop",
    "checkpoint",
    "migrate",
    "topology",
    "cost_model",
    "planner",
    "dist",
    "comm",
    "sharded_embedding",
    "sharding",
    "sharded_checkpoint",
    "distributed_loop",
    "cached_embedding",
    "row_cache_policy",
    "row_optim",
    "prefetch",
]
