"""Config section [hash]: how sparse ids are mapped to embedding rows (see transforms.mappers)."""

from __future__ import annotations

import dataclasses

__all__ = ["HashConfig"]


@dataclasses.dataclass(frozen=True)
class HashConfig:
    # Mapper used until a fitted mapping exists: "modulo" (the hashing trick).
    mapper: str = "modulo"
    # Directory holding fitted, versioned mappings; "" = <cache.path>/mappings.
    mappings_dir: str = ""
