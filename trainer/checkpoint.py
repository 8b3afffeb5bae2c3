"""Atomic trainer checkpoints: model, optimizer, data cursor, metrics, counters.

A checkpoint is one ``torch.save`` file ``ckpt-<trained_batches:012d>.pt`` in the checkpoint
directory, written to a temporary name in the same directory, fsynced and renamed into place,
so a crash at any instant leaves either the previous set of checkpoints or the new one, never
a torn file. The newest ``keep`` checkpoints are kept. Periodic checkpoints may be written in
the background (``save(..., background=True)``, ``trainer.checkpoint_writer``): the state is
snapshotted when ``save`` returns and written while training goes on; ``completed()`` lists
the checkpoints that have become durable.

The file records ``model_shape(cfg)`` (the config fields that decide parameter shapes) and the
optimizer kind; loading into a model of another shape or with another optimizer raises
``CheckpointError`` naming the differing fields, before any state is touched.

An embedding collection that keeps rows outside ``nn.Parameter``s (SSD-backed, sharded)
provides ``checkpoint_state() -> dict`` and ``load_checkpoint_state(dict)``; its entries are
then left out of the model's state dict and stored from those hooks instead. The hooks must
return tensors and plain Python values (the file is loaded with ``weights_only=True``).

A sharded model (``trainer.sharded_embedding.ShardedEmbeddingCollection``, trained by
``trainer.distributed_loop``) is checkpointed by ``ShardedCheckpointManager`` instead: one
directory ``sharded-<trained_batches:012d>/`` per checkpoint, written by every rank together
(``trainer.sharded_checkpoint``: each rank's shards, the dense part, a manifest) with the
cursor, counters, metrics, model shape and optimizer kind in its ``extra``. It loads onto any
world size or plan. The two kinds never mix in one directory: a manager that finds only the
other kind raises ``CheckpointError`` instead of silently starting over.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from storage.atomic import atomic_write
from trainer.checkpoint_writer import BackgroundCheckpointWriter
from trainer.config import TrainSpec
from trainer.data import Cursor
from trainer.embedding import capabilities_of, collections_of
from trainer.errors import CheckpointError
from trainer.metrics import ProgressiveMetrics
from trainer.model import changed_default_hints, model_shape, saved_shape_defaults

__all__ = ["CheckpointManager", "ShardedCheckpointManager", "LoadedCheckpoint", "FORMAT_VERSION",
           "latest_checkpoint", "latest_sharded_checkpoint"]

# 2: embeddings and dense layers with their own optimizers, plain tables fused in one buffer.
FORMAT_VERSION = 2
_NAME = re.compile(r"^ckpt-(\d{12})\.pt$")
_SHARDED_NAME = re.compile(r"^sharded-(\d{12})$")
_SHARDED_TMP = re.compile(r"^\.sharded-(\d{12})\.tmp$")
# storage.atomic.atomic_write names its temp files ".<name>.<random>.tmp"
_TMP_GLOB = ".ckpt-*.tmp"


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
    path: Path
    cursor: Cursor
    counters: dict[str, Any]


def _own_state_collections(model: nn.Module) -> dict[str, nn.Module]:
    """The model's collections that checkpoint themselves, by attribute path."""
    return {prefix: c for prefix, c in collections_of(model).items()
            if capabilities_of(c).own_checkpoint_state}


def _state_key(prefix: str) -> str:
    """The blob key of a self-checkpointing collection's state: ``embeddings_state`` (as
    format 2 has always written it), ``first_order.embeddings_state``."""
    return f"{prefix}_state"


def _outside(key: str, prefixes) -> bool:
    return not any(key.startswith(p + ".") for p in prefixes)


def _init_checkpoint_dir(manager, directory: str | os.PathLike[str], cfg: TrainSpec, keep: int) -> None:
    """Fields every checkpoint manager has; creates the directory."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    manager.directory = Path(directory)
    manager.keep = keep
    manager.shape = model_shape(cfg)
    t = cfg.trainer
    manager.optimizer_kind = f"sparse={t.sparse_optimizer_kind.value},dense={t.dense_optimizer_kind.value}"
    try:
        manager.directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(
            f"cannot create checkpoint directory {manager.directory}: {exc}; "
            "set trainer.checkpoint_dir to a writable path"
        ) from None


def _run_state(manager, cursor: Cursor, counters, metrics: ProgressiveMetrics) -> dict[str, Any]:
    """What every checkpoint records besides parameters: format, shape, position, metrics."""
    return {
        "format_version": FORMAT_VERSION,
        "model_shape": manager.shape,
        "optimizer_kind": manager.optimizer_kind,
        "created_ms": int(time.time() * 1000),
        "cursor": cursor.to_dict(),
        "counters": dict(counters),
        "metrics": metrics.state_dict(),
    }


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The newest complete plain checkpoint in ``directory`` (None: none, or no directory).
    Read-only: unlike constructing a ``CheckpointManager`` it never removes a temp file, so
    another process may call it while the trainer writes a checkpoint."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name)))
    return found[-1][1] if found else None


def latest_sharded_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The newest complete sharded checkpoint directory in ``directory`` (None: none, or no
    directory). Read-only, like ``latest_checkpoint``."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = _sharded_dirs(directory)
    return found[-1] if found else None


class CheckpointManager:
    """Saves and restores checkpoints of one training run in ``directory`` (created if
    missing). Not safe for two trainers sharing a directory."""

    def __init__(self, directory: str | os.PathLike[str], cfg: TrainSpec, *, keep: int = 3):
        _init_checkpoint_dir(self, directory, cfg, keep)
        for stale in self.directory.glob(_TMP_GLOB):
            stale.unlink(missing_ok=True)  # leftovers of a crash mid-write
        self._writer = BackgroundCheckpointWriter()
        self._written: list[Path] = []  # foreground saves not yet reported by completed()

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        found = []
        for p in self.directory.iterdir():
            m = _NAME.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        return latest_checkpoint(self.directory)

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, cursor: Cursor,
             metrics: ProgressiveMetrics, counters: dict[str, Any], background: bool = False) -> Path:
        """Write a checkpoint named by ``counters["trained_batches"]`` and prune old ones.
        The caller flushes embedding collections first (see the loop).

        ``background``: snapshot the state and write it on a thread
        (``trainer.checkpoint_writer``); the returned path is durable only once
        ``completed()``/``wait()`` has listed it. A collection with its own state
        (``checkpoint_state``, e.g. the SSD row store, whose files move on with training) is
        always written in the foreground, as is every save while ``background`` is False."""
        own = _own_state_collections(model)
        state = {k: v for k, v in model.state_dict().items() if _outside(k, own)}
        blob: dict[str, Any] = {**_run_state(self, cursor, counters, metrics),
                                 "optimizer": optimizer.state_dict()}
        for prefix, collection in own.items():
            blob[_state_key(prefix)] = collection.checkpoint_state()
        blob["model"] = state
        path = self.directory / f"ckpt-{int(counters['trained_batches']):012d}.pt"
        if background and not own:
            self._writer.submit(path, blob, on_written=lambda _: self._prune())
            return path
        self._written += self._background_done(self._writer.wait)
        try:
            atomic_write(path, lambda fh: torch.save(blob, fh))
        except OSError as exc:
            raise CheckpointError(f"cannot write checkpoint {path}: {exc}", retriable=True) from None
        self._prune()
        self._written.append(path)
        return path

    def completed(self) -> list[Path]:
        """Checkpoints that became durable since the last call (foreground saves and finished
        background writes), oldest first; never blocks. A failed background write raises its
        ``CheckpointError`` here."""
        done = self._written + self._background_done(self._writer.completed)
        self._written = []
        return done

    def wait(self) -> list[Path]:
        """Block until no background write is in flight; then as ``completed()``."""
        self._written += self._background_done(self._writer.wait)
        return self.completed()

    def _background_done(self, fn) -> list[Path]:
        try:
            return fn()
        except OSError as exc:
            raise CheckpointError(f"cannot write checkpoint in {self.directory}: {exc}",
                                  retriable=True) from None

    def _prune(self) -> None:
        for old in self.checkpoints()[:-self.keep]:
            old.unlink(missing_ok=True)

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer,
             metrics: ProgressiveMetrics, path: str | os.PathLike[str] | None = None
             ) -> LoadedCheckpoint | None:
        """Restore the newest checkpoint (or ``path``) into the given objects; None when the
        directory holds none. Shape and optimizer are checked before anything is modified."""
        path = Path(path) if path is not None else self.latest()
        if path is None:
            if _sharded_dirs(self.directory):
                raise CheckpointError(
                    f"{self.directory} holds sharded checkpoints (sharded-*/) but this trainer writes "
                    "plain ones; set [sharding] enabled = true to resume them, or point "
                    "trainer.checkpoint_dir at a new directory"
                )
            return None
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a damaged file
            raise CheckpointError(
                f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); delete it to "
                "resume from the previous one"
            ) from None
        _check_format(path, blob.get("format_version"))
        _check_compatible(path, blob["model_shape"], blob["optimizer_kind"], self.shape,
                          self.optimizer_kind)
        own = _own_state_collections(model)
        for prefix, collection in collections_of(model).items():
            saved_own = _state_key(prefix) in blob
            if (prefix in own) != saved_own:
                raise CheckpointError(
                    f"checkpoint {path} was written by a "
                    f"{'self-checkpointing' if saved_own else 'plain'} {prefix} "
                    f"collection, but the model now uses {type(collection).__name__}; "
                    "migrate the checkpoint or keep the placement"
                )
        try:
            metrics.load_state_dict(blob["metrics"])
        except ValueError as exc:
            raise CheckpointError(
                f"checkpoint {path}: {exc}; restore trainer.metrics_window to the checkpoint's "
                "value or start a new checkpoint_dir"
            ) from None
        try:
            result = model.load_state_dict(blob["model"], strict=False)
            missing = [k for k in result.missing_keys if _outside(k, own)]
            if missing or result.unexpected_keys:
                raise CheckpointError(
                    f"checkpoint {path} does not fit the model: missing {missing}, "
                    f"unexpected {list(result.unexpected_keys)}"
                )
            for prefix, collection in own.items():
                collection.load_checkpoint_state(blob[_state_key(prefix)])
            optimizer.load_state_dict(blob["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {path} does not fit the model: {exc}") from None
        return LoadedCheckpoint(path, Cursor.from_dict(blob["cursor"]), dict(blob["counters"]))


def _check_format(path: Path, found: Any) -> None:
    if found == FORMAT_VERSION:
        return
    if found == 1:
        raise CheckpointError(
            f"checkpoint {path} was written by headrace 0.1 (one optimizer for embeddings and "
            "dense layers, one table per feature); this release fuses the tables and trains them "
            "with their own optimizer ([trainer] sparse_optimizer), so it cannot resume that state. "
            "Point trainer.checkpoint_dir at a new directory: the trainer starts over and replays "
            "the batch cache from its first retained batch"
        )
    raise CheckpointError(
        f"checkpoint {path} has trainer format {found!r}, this headrace reads format "
        f"{FORMAT_VERSION} (was it written by the trainer?)"
    )


def _check_compatible(path: Path, saved_shape: dict, saved_optimizer: str, shape: dict,
                      optimizer_kind: str) -> None:
    # A shape recorded before [model] existed is a DLRM without the first-order part.
    legacy = "kind" not in saved_shape
    saved_shape = saved_shape_defaults(saved_shape)
    if saved_shape != shape:
        keys = list(shape) + [k for k in saved_shape if k not in shape]
        diffs = [
            f"{k}: checkpoint {saved_shape.get(k)!r} vs config {shape.get(k)!r}"
            for k in keys if saved_shape.get(k) != shape.get(k)
        ]
        changed = changed_default_hints(saved_shape, shape)
        if legacy:
            # interaction is among the legacy settings; other changed defaults may apply too
            more = "".join(f" and {h}" for key, h in changed.items() if key != "interaction")
            hint = ("; it was written before [model] existed, by a DLRM without the first-order part: "
                    "resume it with [model] kind = \"dlrm\", wide = false and interaction = \"dot\""
                    f"{more}, or point trainer.checkpoint_dir at a new directory")
        elif changed:
            hint = ("; the checkpoint has an earlier default, changed since: resume it with "
                    + " and ".join(changed.values()) + ", or point trainer.checkpoint_dir at a new directory")
        else:
            hint = "; restore the old config or point trainer.checkpoint_dir at a new directory"
        raise CheckpointError(
            f"checkpoint {path} was trained with a differently shaped model ("
            + "; ".join(diffs) + ")" + hint
        )
    if saved_optimizer != optimizer_kind:
        raise CheckpointError(
            f"checkpoint {path} used optimizer {saved_optimizer!r}, config says "
            f"{optimizer_kind!r}; keep the optimizer or start a new checkpoint_dir"
        )


def _sharded_dirs(directory: Path) -> list[Path]:
    """Complete sharded checkpoints (their manifest exists), oldest first."""
    from trainer.sharded_checkpoint import MANIFEST

    found = []
    for p in directory.iterdir():
        m = _SHARDED_NAME.match(p.name)
        if m and (p / MANIFEST).exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def _fsync_tree(directory: Path) -> None:
    """fsync every file of ``directory`` and the directory itself (the sharded writer
    renames its files into place but does not sync them)."""
    for p in directory.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


class ShardedCheckpointManager:
    """Checkpoints of a sharded DLRM in ``directory``, one ``sharded-<n:012d>/`` directory each.

    Collective: every rank of the job constructs it and calls ``save``/``load`` at the same
    point with its own model and dense optimizer (``load`` may run on another world size or
    plan than the ``save``: shards are reassembled). Each shard is saved with its sparse
    optimizer state, and the update count with them (``trainer.sharded_checkpoint``); the
    dense optimizer's state goes with the dense layers. Rank 0 alone renames, prunes and
    cleans up.

    Atomicity: every rank writes into ``.sharded-<n>.tmp/``; once all of them wrote and the
    manifest exists, rank 0 fsyncs the files and renames the directory into place. A crash
    at any instant leaves the older checkpoints intact; leftovers are removed on the next
    start. The newest ``keep`` are kept. Not safe for two jobs sharing a directory.
    """

    def __init__(self, directory: str | os.PathLike[str], cfg: TrainSpec, *, rank: int,
                 keep: int = 3):
        _init_checkpoint_dir(self, directory, cfg, keep)
        self.rank = rank
        self._written: list[Path] = []
        if rank == 0:
            self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Temp directories and directories without a manifest: saves a crash interrupted."""
        from trainer.sharded_checkpoint import MANIFEST

        for p in self.directory.iterdir():
            torn = _SHARDED_NAME.match(p.name) and not (p / MANIFEST).exists()
            if p.is_dir() and (torn or _SHARDED_TMP.match(p.name)):
                shutil.rmtree(p, ignore_errors=True)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return _sharded_dirs(self.directory)

    def latest(self) -> Path | None:
        cps = self.checkpoints()
        return cps[-1] if cps else None

    def completed(self) -> list[Path]:
        """Checkpoints saved since the last call (sharded ones are written in the foreground,
        so each is durable when ``save`` returns)."""
        done, self._written = self._written, []
        return done

    def wait(self) -> list[Path]:
        return self.completed()

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, cursor: Cursor,
             metrics: ProgressiveMetrics, counters: dict[str, Any], background: bool = False) -> Path:
        """Write the checkpoint named by ``counters["trained_batches"]`` (collective; returns
        on every rank once it is in place; ``background`` is ignored: every rank's shards are
        written together, in the foreground). ``metrics`` must be the same on every rank (the
        distributed loop keeps them so); rank 0's copy is stored."""
        from trainer.sharded_checkpoint import save_sharded_checkpoint

        n = int(counters["trained_batches"])
        final = self.directory / f"sharded-{n:012d}"
        tmp = self.directory / f".sharded-{n:012d}.tmp"
        if self.rank == 0 and tmp.exists():
            shutil.rmtree(tmp)
        _barrier()  # nobody writes into the temp directory before it is fresh
        extra = _run_state(self, cursor, counters, metrics)
        try:
            save_sharded_checkpoint(tmp, model, optimizer, extra)  # barriers: all ranks wrote
            if self.rank == 0:
                _fsync_tree(tmp)
                if final.exists():  # the same count saved again (e.g. a rerun): replace it
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _fsync_dir(self.directory)
                for old in self.checkpoints()[:-self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
        except OSError as exc:
            raise CheckpointError(f"cannot write sharded checkpoint {final}: {exc}", retriable=True) from None
        _barrier()  # every rank returns with the checkpoint in place
        self._written.append(final)
        return final

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer,
             metrics: ProgressiveMetrics, path: str | os.PathLike[str] | None = None
             ) -> LoadedCheckpoint | None:
        """Restore the newest checkpoint (or ``path``) into this rank's model, optimizer and
        metrics (collective); None when there is none. Shape, optimizer kind and format are
        checked before anything is modified."""
        from trainer.sharded_checkpoint import load_sharded_checkpoint

        path = Path(path) if path is not None else self.latest()
        if path is None:
            if any(_NAME.match(p.name) for p in self.directory.iterdir()):
                raise CheckpointError(
                    f"{self.directory} holds plain checkpoints (ckpt-*.pt) but [sharding] is enabled; "
                    "disable [sharding] to resume them, or point trainer.checkpoint_dir at a new "
                    "directory"
                )
            return None
        try:
            dense = torch.load(path / "dense.pt", map_location="cpu", mmap=True, weights_only=True)
        except Exception as exc:  # torch raises many types for a damaged file
            raise CheckpointError(
                f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); delete the "
                "directory to resume from the previous one"
            ) from None
        extra = dense.get("extra") or {}
        _check_format(path, extra.get("format_version"))
        _check_compatible(path, extra["model_shape"], extra["optimizer_kind"], self.shape,
                          self.optimizer_kind)
        probe = ProgressiveMetrics(metrics.window_samples, metrics.auc_bins)
        try:
            probe.load_state_dict(extra["metrics"])
        except ValueError as exc:
            raise CheckpointError(
                f"checkpoint {path}: {exc}; restore trainer.metrics_window to the checkpoint's "
                "value or start a new checkpoint_dir"
            ) from None
        load_sharded_checkpoint(path, model, optimizer)
        metrics.load_state_dict(extra["metrics"])
        return LoadedCheckpoint(path, Cursor.from_dict(extra["cursor"]), dict(extra["counters"]))
