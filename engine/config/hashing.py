"""Config section [hash]: how sparse ids are mapped to embedding rows (see transforms.mappers,
transforms.learned_hash, transforms.hash_fit, engine.fit_hash)."""

from __future__ import annotations

import dataclasses
import enum

__all__ = ["HashConfig", "FitKind"]


class FitKind(enum.Enum):
    """What ``headrace fit-hash`` (and the periodic re-fit in ``serve``) fits per feature."""

    LEARNED = "learned"  # hot ids own rows, other seen ids share rows by similarity cluster
    FREQUENCY = "frequency"  # hot ids own rows, every other id hashed into the rest


@dataclasses.dataclass(frozen=True)
class HashConfig:
    # Mapper used until a fitted mapping exists: "modulo" (the hashing trick) or "double".
    mapper: str = "modulo"
    # Directory holding fitted, versioned mappings; "" = <cache.path>/mappings.
    mappings_dir: str = ""
    # --- fitting (headrace fit-hash, serve's periodic re-fit)
    fit: FitKind = FitKind.LEARNED
    hot_fraction: float = 0.25  # share of a table's rows owned by its most frequent ids
    reserve_fraction: float = 0.02  # share of rows for ids unseen at fit time (at least 1 row)
    label_weight: float = 1.0  # weight of the click-through statistic in the id similarity
    embedding_weight: float = 1.0  # weight of the current model's embeddings in the similarity
    embedding_components: int = 4  # principal components of the embeddings used
    min_events_to_fit: int = 10_000  # a feature with fewer counted events keeps its mapper
    # Periodic re-fit in serve: seconds between fits (0 = never re-fit automatically).
    refit_every_s: float = 0.0
    # --- statistics kept with the cache (storage.id_stats)
    stats_enabled: bool = True
    stats_head_capacity: int = 1_000_000  # exact per-id counts kept per feature
    sketch_width: int = 1 << 16  # count-min sketch of the evicted tail, per feature
    sketch_depth: int = 4

    def __post_init__(self):
        for name in ("hot_fraction", "reserve_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        if self.hot_fraction + self.reserve_fraction >= 1.0:
            raise ValueError(
                f"hot_fraction + reserve_fraction = {self.hot_fraction + self.reserve_fraction} leaves no "
                "rows to share; keep their sum below 1"
            )
        if self.label_weight < 0 or self.embedding_weight < 0:
            raise ValueError("label_weight and embedding_weight must be >= 0")
        if self.embedding_components < 1:
            raise ValueError("embedding_components must be >= 1")
        if self.min_events_to_fit < 0 or self.refit_every_s < 0:
            raise ValueError("min_events_to_fit and refit_every_s must be >= 0")
        if self.stats_head_capacity < 2:
            raise ValueError(f"stats_head_capacity must be >= 2, got {self.stats_head_capacity}")
        if not 1 <= self.sketch_width < 1 << 32 or self.sketch_depth < 1:
            raise ValueError("sketch_width must be in [1, 2**32) and sketch_depth >= 1")
