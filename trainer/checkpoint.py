"""Atomic trainer checkpoints: model, optimizer, data cursor, metrics, counters.

A checkpoint is one ``torch.save`` file ``ckpt-<trained_batches:012d>.pt`` in the checkpoint
directory, written to a temporary name in the same directory, fsynced and renamed into place,
so a crash at any instant leaves either the previous set of checkpoints or the new one, never
a torn file. The newest ``keep`` checkpoints are kept.

The file records ``model_shape(cfg)`` (the config fields that decide parameter shapes) and the
optimizer kind; loading into a model of another shape or with another optimizer raises
``CheckpointError`` naming the differing fields, before any state is touched.

An embedding collection that keeps rows outside ``nn.Parameter``s (SSD-backed, sharded)
provides ``checkpoint_state() -> dict`` and ``load_checkpoint_state(dict)``; its entries are
then left out of the model's state dict and stored from those hooks instead. The hooks must
return tensors and plain Python values (the file is loaded with ``weights_only=True``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.config import HeadraceConfig
from engine.errors import CheckpointError
from storage.atomic import atomic_write
from trainer.data import Cursor
from trainer.metrics import ProgressiveMetrics
from trainer.model import model_shape

__all__ = ["CheckpointManager", "LoadedCheckpoint", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{12})\.pt$")
# storage.atomic.atomic_write names its temp files ".<name>.<random>.tmp"
_TMP_GLOB = ".ckpt-*.tmp"


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
    path: Path
    cursor: Cursor
    counters: dict[str, Any]


def _has_own_state(embeddings: nn.Module | None) -> bool:
    return embeddings is not None and hasattr(embeddings, "checkpoint_state") \
        and hasattr(embeddings, "load_checkpoint_state")


class CheckpointManager:
    """Saves and restores checkpoints of one training run in ``directory`` (created if
    missing). Not safe for two trainers sharing a directory."""

    def __init__(self, directory: str | os.PathLike[str], cfg: HeadraceConfig, *, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.shape = model_shape(cfg)
        self.optimizer_kind = cfg.trainer.optimizer.value
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(
                f"cannot create checkpoint directory {self.directory}: {exc}; "
                "set trainer.checkpoint_dir to a writable path"
            ) from None
        for stale in self.directory.glob(_TMP_GLOB):
            stale.unlink(missing_ok=True)  # leftovers of a crash mid-write

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        found = []
        for p in self.directory.iterdir():
            m = _NAME.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        cps = self.checkpoints()
        return cps[-1] if cps else None

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, cursor: Cursor,
             metrics: ProgressiveMetrics, counters: dict[str, Any]) -> Path:
        """Write a checkpoint named by ``counters["trained_batches"]`` and prune old ones.
        The caller flushes embedding collections first (see the loop)."""
        embeddings = getattr(model, "embeddings", None)
        state = model.state_dict()
        blob: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "model_shape": self.shape,
            "optimizer_kind": self.optimizer_kind,
            "created_ms": int(time.time() * 1000),
            "cursor": cursor.to_dict(),
            "counters": dict(counters),
            "metrics": metrics.state_dict(),
            "optimizer": optimizer.state_dict(),
        }
        if _has_own_state(embeddings):
            state = {k: v for k, v in state.items() if not k.startswith("embeddings.")}
            blob["embeddings_state"] = embeddings.checkpoint_state()
        blob["model"] = state
        path = self.directory / f"ckpt-{int(counters['trained_batches']):012d}.pt"
        try:
            atomic_write(path, lambda fh: torch.save(blob, fh))
        except OSError as exc:
            raise CheckpointError(f"cannot write checkpoint {path}: {exc}", retriable=True) from None
        for old in self.checkpoints()[:-self.keep]:
            old.unlink(missing_ok=True)
        return path

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer,
             metrics: ProgressiveMetrics, path: str | os.PathLike[str] | None = None
             ) -> LoadedCheckpoint | None:
        """Restore the newest checkpoint (or ``path``) into the given objects; None when the
        directory holds none. Shape and optimizer are checked before anything is modified."""
        path = Path(path) if path is not None else self.latest()
        if path is None:
            return None
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a damaged file
            raise CheckpointError(
                f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); delete it to "
                "resume from the previous one"
            ) from None
        if blob.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {path} has format {blob.get('format_version')}, this headrace "
                f"reads format {FORMAT_VERSION}"
            )
        if blob["model_shape"] != self.shape:
            diffs = [
                f"{k}: checkpoint {blob['model_shape'].get(k)!r} vs config {v!r}"
                for k, v in self.shape.items() if blob["model_shape"].get(k) != v
            ]
            raise CheckpointError(
                f"checkpoint {path} was trained with a differently shaped model ("
                + "; ".join(diffs)
                + "); restore the old config or point trainer.checkpoint_dir at a new directory"
            )
        if blob["optimizer_kind"] != self.optimizer_kind:
            raise CheckpointError(
                f"checkpoint {path} used optimizer {blob['optimizer_kind']!r}, config says "
                f"{self.optimizer_kind!r}; keep the optimizer or start a new checkpoint_dir"
            )
        embeddings = getattr(model, "embeddings", None)
        own = _has_own_state(embeddings)
        if own != ("embeddings_state" in blob):
            raise CheckpointError(
                f"checkpoint {path} was written by a "
                f"{'self-checkpointing' if 'embeddings_state' in blob else 'plain'} embedding "
                f"collection, but the model now uses {type(embeddings).__name__}; "
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
            missing = [k for k in result.missing_keys if not (own and k.startswith("embeddings."))]
            if missing or result.unexpected_keys:
                raise CheckpointError(
                    f"checkpoint {path} does not fit the model: missing {missing}, "
                    f"unexpected {list(result.unexpected_keys)}"
                )
            if own:
                embeddings.load_checkpoint_state(blob["embeddings_state"])
            optimizer.load_state_dict(blob["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {path} does not fit the model: {exc}") from None
        return LoadedCheckpoint(path, Cursor.from_dict(blob["cursor"]), dict(blob["counters"]))
