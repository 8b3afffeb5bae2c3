"""Row migration of SSD-resident tables (``trainer.cached_embedding``) at a mapping-version
boundary: the rows are rewritten in the row store itself, through its undo log.

Steps, for a ``CachedEmbeddingBagCollection``:

1. ``evict_all()``: every dirty cached row is written back (uncommitted) and the device
   cache is emptied, so the store alone holds the rows and no stale copy stays cached;
2. per migrating table, one read-only pass over the ids computes each new row's partial
   sums from the old rows (``trainer.migrate_rows.partial_sums``, the whole table as one
   block, reading the rows it needs from the store); nothing is written until it ends,
   because old and new rows share the store;
3. the new rows are written in chunks of ``CHUNK_ROWS`` rows (``RowStore.write``): the first
   write of a row in the store's current epoch logs its old record and syncs the log before
   overwriting it. Nothing is committed here: the next checkpoint's ``flush()`` commits.

Crash safety: a SIGKILL at any point of the migration leaves an uncommitted epoch, which
the store rolls back when it is opened; the trainer then resumes from its checkpoint (taken
before the boundary, with the store version it names), reaches the boundary again and
migrates the same rows to the same values. A checkpoint after the boundary commits the
migrated rows with the rows trained since, as one version.

Memory: O(distinct new rows the ids reach x (dim + state)) for the partial sums plus one
chunk; the values are those of the plain migration (``trainer.migrate.migrate_table``) of
the same table, rounded to fp32 the same way.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from trainer.cached_embedding import CachedEmbeddingBagCollection
from trainer.migrate_rows import MigrationInputs, finish_table_rows, partial_sums

__all__ = ["migrate_row_cache", "CHUNK_ROWS"]

#: Rows written per store write (each one undo-logged and synced before it lands).
CHUNK_ROWS = 1 << 16


@torch.no_grad()
def migrate_row_cache(collection: CachedEmbeddingBagCollection, jobs: Mapping[str, MigrationInputs]) -> None:
    """Migrate the tables named in ``jobs`` (table -> its change and ids) in the row store
    behind ``collection`` (see the module docstring)."""
    collection.evict_all()
    store = collection.store
    for table, inputs in jobs.items():
        spec = store.tables[table]
        cols = spec.dim + spec.state_dim

        def read(local: torch.Tensor, table: str = table) -> torch.Tensor:
            w, s = store.read(table, local.cpu().numpy())
            return torch.from_numpy(np.concatenate([w, s], axis=1)).to(torch.float64)

        # one trailing column of id weights: every id's old rows are in this block, so it
        # sums, per new row, the weight of its member ids
        p = partial_sums(inputs, read, 0, spec.rows, cols, spec.dim, count_column=True)
        for lo in range(0, spec.rows, CHUNK_ROWS):
            hi = min(spec.rows, lo + CHUNK_ROWS)
            rows = torch.arange(lo, hi)
            out = finish_table_rows(inputs, p, lo, hi, spec.dim, lambda rows=rows: read(rows))
            values = out.to(torch.float32).numpy()
            store.write(table, rows.numpy(), values[:, :spec.dim], values[:, spec.dim:])
