"""What every spawned gloo rank of the trainer tests does around its body (no tests here)."""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["rank_errors_to", "run_ranks"]


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


def run_ranks(worker: Callable[..., None], world: int, out_dir: str, *args: Any,
              meanwhile: Callable[[], Any] | None = None) -> Any:
    """Run ``worker(rank, world, out_dir, *args)`` on ``world`` ranks: rank 0 in this process
    (torch is imported here already; a process start is most of a short test's time), the
    others spawned. ``meanwhile()`` runs here while the spawned ranks start, before rank 0
    joins them (e.g. to write the cache they read); its result is returned, its error raised
    as it is (the spawned ranks killed). The worker wraps its body in
    ``rank_errors_to(out_dir, rank)``; a failed rank is raised here as an ``AssertionError``
    with every rank's traceback. This process's torch thread count is restored afterwards."""
    procs = [mp.get_context("spawn").Process(target=worker, args=(rank, world, out_dir, *args))
             for rank in range(1, world)]
    for p in procs:
        p.start()
    threads = torch.get_num_threads()

    def errors() -> str:
        return "\n".join(p.read_text() for p in sorted(Path(out_dir).glob("error-*.txt")))

    try:
        result = None if meanwhile is None else meanwhile()
    except BaseException:
        _end(procs, grace_s=0)  # they would wait for rank 0 until their timeout
        raise
    try:
        worker(0, world, out_dir, *args)
    except BaseException as exc:
        _end(procs, grace_s=10)  # a rank left waiting for this one would wait for its timeout
        raise AssertionError(f"a rank failed:\n{errors() or exc}") from None
    finally:
        torch.set_num_threads(threads)
        _end(procs, grace_s=60)
    assert all(p.exitcode == 0 for p in procs), f"a rank failed:\n{errors()}"
    return result


def _end(procs: list, grace_s: float) -> None:
    """Join ``procs``, killing those still alive after ``grace_s`` seconds."""
    for p in procs:
        p.join(timeout=grace_s)
        if p.is_alive():
            p.kill()
            p.join()
