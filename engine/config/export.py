"""Config section [export]: model packages ``serve`` writes on a schedule (``engine.export``).

Example (TOML):

    [export]
    dir = "./headrace-data/exports"   # pkg-00000001, pkg-00000002, ... (newest = highest)
    every_s = 60.0                    # export the newest checkpoint this often; 0 = never
    full_every = 10                   # every 10th export is full, the ones between are deltas
    keep = 20                         # newest packages kept (and the bases their deltas need)
    dtype = "fp32"                    # table precision in the package: fp32 | fp16 | bf16
    program = true                    # also torch.export the dense part (a few seconds)

``headrace export`` (the command) takes its own arguments and ignores this section.
"""

from __future__ import annotations

import dataclasses

from trainer.config import EmbeddingDtype

__all__ = ["ExportConfig"]


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    dir: str = "./headrace-data/exports"
    every_s: float = 0.0
    full_every: int = 10
    keep: int = 20
    dtype: EmbeddingDtype = EmbeddingDtype.FP32
    program: bool = True

    def __post_init__(self):
        if not 0 <= self.every_s < float("inf"):
            raise ValueError(f"every_s must be a finite number >= 0 (0 = no scheduled exports), got {self.every_s}")
        if self.full_every < 1:
            raise ValueError(f"full_every must be >= 1 (1 = every export is full), got {self.full_every}")
        if self.keep < 1:
            raise ValueError(f"keep must be >= 1, got {self.keep}")
        if self.every_s > 0 and not self.dir:
            raise ValueError("dir must name where scheduled exports go")
