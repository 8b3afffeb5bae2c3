"""On-disk format of the embedding row store: fixed-size row records, undo logs, manifest.

Pure layout and encoding; the file handling lives in ``storage.row_store``.

A table of ``rows`` rows is one sparse file of ``rows * record_floats`` float32 values,
row-major. Each record is ``[weights (dim) | optimizer state (state_dim) | flag]``. The flag
is 1.0 once the row has been written; a never-written row reads as zeros (a file hole, no
disk space at page granularity) and is materialised by the caller's deterministic
initialiser. The undo log of one epoch (all tables) is a 16-byte header followed by chunks:
``(table index uint32, count uint32)`` then ``count`` entries ``(row int64, old record
float32[record_floats of that table])``; a torn last chunk is ignored.
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np

__all__ = [
    "RowTableSpec", "FORMAT_VERSION", "MANIFEST_NAME", "UNDO_MAGIC", "UNDO_HEADER_BYTES",
    "table_file_name", "undo_file_name", "undo_entry_dtype", "encode_undo_header",
    "decode_undo_header", "FLAG_MATERIALIZED", "UNDO_CHUNK_HEADER", "encode_undo_chunk",
    "decode_undo_chunks",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "MANIFEST.json"
UNDO_MAGIC = b"HRUNDO01"
UNDO_HEADER_BYTES = 16
FLAG_MATERIALIZED = 1.0


@dataclasses.dataclass(frozen=True)
class RowTableSpec:
    """One table of the row store: ``rows`` records of ``dim`` weights and ``state_dim``
    optimizer-state floats (0 for SGD, 1 for row-wise Adagrad)."""

    name: str
    rows: int
    dim: int
    state_dim: int

    def __post_init__(self):
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"table name {self.name!r} must be a plain file-name-safe string")
        if self.rows < 1 or self.dim < 1 or self.state_dim < 0:
            raise ValueError(
                f"table {self.name!r}: rows and dim must be >= 1 and state_dim >= 0, "
                f"got rows={self.rows} dim={self.dim} state_dim={self.state_dim}"
            )

    @property
    def record_floats(self) -> int:
        return self.dim + self.state_dim + 1

    @property
    def record_bytes(self) -> int:
        return 4 * self.record_floats

    @property
    def file_bytes(self) -> int:
        return self.rows * self.record_bytes

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def table_file_name(table: str) -> str:
    return f"{table}.rows"


def undo_file_name(epoch: int) -> str:
    """Undo log of the epoch that started at committed version ``epoch``."""
    return f"undo-{epoch:012d}.log"


def undo_entry_dtype(record_floats: int) -> np.dtype:
    return np.dtype([("row", "<i8"), ("record", "<f4", (record_floats,))])


UNDO_CHUNK_HEADER = struct.Struct("<II")


def encode_undo_header(num_tables: int) -> bytes:
    return UNDO_MAGIC + struct.pack("<II", num_tables, 0)


def decode_undo_header(header: bytes, path: str) -> int:
    """Return the table count recorded in an undo log header; ValueError when it is not one."""
    if len(header) < UNDO_HEADER_BYTES or header[:8] != UNDO_MAGIC:
        raise ValueError(f"{path}: not a headrace undo log (bad magic)")
    (num_tables, _reserved) = struct.unpack("<II", header[8:UNDO_HEADER_BYTES])
    return num_tables


def encode_undo_chunk(table_index: int, rows: np.ndarray, records: np.ndarray) -> bytes:
    entries = np.empty(len(rows), undo_entry_dtype(records.shape[1]))
    entries["row"] = rows
    entries["record"] = records
    return UNDO_CHUNK_HEADER.pack(table_index, len(rows)) + entries.tobytes()


def decode_undo_chunks(data: bytes, record_floats: list[int]):
    """Yield ``(table_index, entries)`` of each whole chunk after the header; stops at a torn
    chunk (its data writes never happened: entries are made durable before them)."""
    pos = UNDO_HEADER_BYTES
    while pos + UNDO_CHUNK_HEADER.size <= len(data):
        table_index, count = UNDO_CHUNK_HEADER.unpack_from(data, pos)
        if table_index >= len(record_floats):
            raise ValueError(f"undo chunk names table {table_index} of {len(record_floats)}")
        dtype = undo_entry_dtype(record_floats[table_index])
        end = pos + UNDO_CHUNK_HEADER.size + count * dtype.itemsize
        if end > len(data):
            return
        yield table_index, np.frombuffer(data, dtype, count=count, offset=pos + UNDO_CHUNK_HEADER.size)
        pos = end
