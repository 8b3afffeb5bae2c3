"""The dense/interaction part of a model as a ``torch.export`` program, for serving stacks
that run programs rather than headrace's Python.

The program is the model with every embedding collection replaced by an input: it takes
``(dense [B, num_dense], {collection path: pooled [B, F, D]})`` and returns the logits
[B], with a dynamic batch size. Pooled embeddings come from the package's tables (sum of the
rows of each feature's values, as ``embedding_bag(mode="sum")``). A model whose forward
does more with its sparse input than hand it to its collections cannot be exported this
way; ``export_dense_program`` then raises ``TrainerError`` naming the reason, and the
package holds the dense state dict only.

Example:
    >>> program = load_dense_program("pkg/dense_program.pt2")          # doctest: +SKIP
    >>> logits = program(dense, {"embeddings": pooled})                 # doctest: +SKIP
"""

from __future__ import annotations

import copy
import io
import os
from typing import Callable

import torch
from torch import nn

from trainer.errors import TrainerError

__all__ = ["export_dense_program", "load_dense_program", "PROGRAM_FILE"]

PROGRAM_FILE = "dense_program.pt2"
_EXAMPLE_BATCH = 4


class _PooledInput(nn.Module):
    """Stands in for an embedding collection: returns the pooled tensor passed for it."""

    def __init__(self, key: str):
        super().__init__()
        self.key = key

    def forward(self, sparse: dict[str, torch.Tensor]) -> torch.Tensor:
        return sparse[self.key]


class _DenseProgram(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, dense: torch.Tensor, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(dense, pooled)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def export_dense_program(model: nn.Module, collections: dict[str, nn.Module], num_dense: int) -> bytes:
    """``torch.export`` the dense part of ``model`` (``collections``: its embedding
    collections by module path, each with ``feature_names`` and ``dim``) and return the
    saved program's bytes. ``TrainerError`` when the model cannot be exported this way."""
    if any(path == "" for path in collections):
        raise TrainerError("the model is itself an embedding collection; it has no dense part to export")
    dense_part = copy.deepcopy(model).eval()
    for path in collections:
        _set_submodule(dense_part, path, _PooledInput(path))
    batch = torch.export.Dim("batch", min=1)
    dense = torch.zeros(_EXAMPLE_BATCH, num_dense)
    pooled = {p: torch.zeros(_EXAMPLE_BATCH, len(c.feature_names), int(c.dim)) for p, c in collections.items()}
    try:
        program = torch.export.export(_DenseProgram(dense_part), (dense, pooled),
                                      dynamic_shapes=({0: batch}, {p: {0: batch} for p in pooled}))
        buf = io.BytesIO()
        torch.export.save(program, buf)
    except Exception as exc:  # torch.export raises many types for what it cannot trace
        raise TrainerError(f"the dense part cannot be exported as a program ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return buf.getvalue()


def load_dense_program(path: str | os.PathLike[str]) -> Callable[..., torch.Tensor]:
    """The program saved by ``export_dense_program``, callable as
    ``program(dense, {collection path: pooled})``."""
    return torch.export.load(os.fspath(path)).module()
