"""Config section [sharding]: how embedding tables are placed across devices (trainer.planner)."""

from __future__ import annotations

import dataclasses

__all__ = ["ShardingConfig"]


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    enabled: bool = False
