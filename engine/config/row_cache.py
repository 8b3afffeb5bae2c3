"""Config section [row_cache]: SSD-backed embedding rows with a device/DRAM cache."""

from __future__ import annotations

import dataclasses

__all__ = ["RowCacheConfig"]


@dataclasses.dataclass(frozen=True)
class RowCacheConfig:
    enabled: bool = False
