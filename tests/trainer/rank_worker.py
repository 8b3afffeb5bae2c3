"""What every spawned gloo rank of the trainer tests does around its body (no tests here)."""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Iterator

import torch.distributed as dist

__all__ = ["rank_errors_to"]


@contextlib.contextmanager
def rank_errors_to(out_dir: str, rank: int) -> Iterator[None]:
    """A failure inside the block is written to ``out_dir/error-<rank>.txt`` (the parent
    test reports it: a spawned rank's traceback is otherwise lost) and re-raised; the
    process group is destroyed on the way out either way."""
    try:
        yield
    except BaseException:
        with open(os.path.join(out_dir, f"error-{rank}.txt"), "w") as fh:
            fh.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
