"""Checkpoint writes off the training thread: snapshot now, write and fsync in the background.

``BackgroundCheckpointWriter.submit(path, blob, on_written)`` first waits for the previous
write (at most one is in flight, so host memory holds at most one snapshot), then copies every
tensor of ``blob`` into host buffers it owns (``snapshot``) and returns; a thread writes the
snapshot with ``storage.atomic.atomic_write`` (temp file, fsync, rename, directory fsync) and
then calls ``on_written(path)`` (pruning old checkpoints). Training goes on meanwhile: the
snapshot is a copy, so later steps cannot change what is written.

Crash safety is the atomic write's: a SIGKILL before the rename leaves only a temp file (the
previous checkpoint stays the newest; ``CheckpointManager`` removes the temp file on the next
start), after it the new checkpoint is whole. A checkpoint counts as taken only once
``completed()`` or ``wait()`` has returned its path: callers that act on a checkpoint being
durable (the trainer registers its cache reader position for retention) wait for that.

On CUDA the snapshot copies device tensors into pinned host buffers with ``non_blocking``
and records an event; the writer thread waits for the event before reading them, so the
training stream is never synchronised by a checkpoint. The buffers are reused from one
checkpoint to the next when shapes match.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

import torch

from storage.atomic import atomic_write

__all__ = ["BackgroundCheckpointWriter", "snapshot"]


def snapshot(obj: Any, buffers: dict[tuple, torch.Tensor] | None = None, key: tuple = ()) -> Any:
    """A copy of ``obj`` (nested dicts / lists / tuples of tensors and plain values) whose
    tensors live in host memory not shared with ``obj``. Device tensors are copied with
    ``non_blocking`` into pinned buffers taken from (and added to) ``buffers``: the caller
    synchronises before reading them (``BackgroundCheckpointWriter`` records an event)."""
    if buffers is None:
        buffers = {}
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.device.type == "cpu":
            return t.clone()
        buf = buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
            buffers[key] = buf
        buf.copy_(t, non_blocking=True)
        return buf
    if isinstance(obj, dict):  # state dicts (OrderedDict) load back from plain dicts alike
        return {k: snapshot(v, buffers, key + (k,)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v, buffers, key + (i,)) for i, v in enumerate(obj))
    return obj


class BackgroundCheckpointWriter:
    """Writes one checkpoint file at a time on a daemon thread (see the module docstring).

    Not thread-safe: one training thread calls ``submit``/``completed``/``wait``. An error in
    the background write is raised by the next ``submit``, ``completed`` or ``wait``.
    """

    def __init__(self, write_blob: Callable[[Any, Any], None] = torch.save):
        self._write_blob = write_blob
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._done: list[Path] = []
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        """Whether a write is in flight."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, path: Path, blob: dict[str, Any],
               on_written: Callable[[Path], None] | None = None) -> None:
        """Snapshot ``blob`` and write it to ``path`` in the background. Blocks only while a
        previous write is still in flight (and for the snapshot copy)."""
        self._join()
        self._raise_error()
        copy = snapshot(blob, self._buffers)
        event = None
        if torch.cuda.is_available() and any(b.is_pinned() for b in self._buffers.values()):
            event = torch.cuda.Event()
            event.record()

        def work() -> None:
            try:
                if event is not None:
                    event.synchronize()
                atomic_write(path, lambda fh: self._write_blob(copy, fh))
                if on_written is not None:
                    on_written(path)
                with self._lock:
                    self._done.append(path)
            except BaseException as exc:  # re-raised on the training thread
                self._error = exc

        self._thread = threading.Thread(target=work, name=f"checkpoint-{path.name}", daemon=True)
        self._thread.start()

    def completed(self) -> list[Path]:
        """Paths written (durable) since the last call, oldest first; never blocks."""
        if not self.busy:
            self._join()
        self._raise_error()
        with self._lock:
            done, self._done = self._done, []
        return done

    def wait(self) -> list[Path]:
        """Block until no write is in flight; then as ``completed()``."""
        self._join()
        return self.completed()

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _raise_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err
