"""The cache write of a bounded run on a distributed runner: workers stage, the driver imports.

``BatchCache`` accepts only the batch that continues a partition's stored offset, and the
cache is one LMDB file written by one host. On a distributed runner (Dask here; Flink,
Spark, Dataflow alike) a partition's batches may reach different workers, in any order,
and a worker may run on another host. So the graph's last step on such a runner does not
touch the cache:

- ``StageBatches`` (workers) writes each ``ProcessedBatch`` as one file
  ``<staging>/<partition key>/<start>-<end>.pb`` (pickled; written under a temporary name
  and renamed, so a reader only ever sees whole files; a retried task rewrites the same
  name with the same content).
- ``StagedImporter`` (the driver, while the pipeline runs) writes every staged batch whose
  predecessor is already in the cache, in offset order, through the same
  ``OrderedCacheWriter`` as the in-graph writer, then deletes its file. Memory stays at one
  batch whatever the order of arrival; progress shows in the cache as the run goes.

Exactly once: the cache write is atomic and idempotent by offsets, the staging directory
is this run's own (the source starts at the cache's offsets), and a staged range the
cache already holds is deleted unread. A batch still staged when the pipeline has finished
waits for a predecessor that never came: the run fails (CacheError) rather than leave a
hole; nothing after the hole was stored, so the next run reads it again.

Chosen over ``GroupByKey`` on (topic, partition) (one writer per partition, in the graph):
a group is materialised before its writer runs, so a backfill would hold all of its
processed data in worker memory at the shuffle barrier, write nothing until then, and each
writer would still need the cache on its own host. Staging costs one pickle to local disk
per batch (README "Scaling out" has the figures).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import shutil
import tempfile
import threading
from typing import Callable, Iterator

import apache_beam as beam
import orjson

from engine.errors import CacheError
from storage.batch_cache import BatchCache
from transforms.elements import ProcessedBatch

__all__ = ["StageBatches", "StagedImporter", "staging_area", "run_with_import"]

log = logging.getLogger(__name__)

_SUFFIX = ".pb"
_KEY_FILE = "key.json"


def _key_dir(topic: str, partition: int) -> str:
    return hashlib.sha1(f"{topic}\0{partition}".encode()).hexdigest()


def _write_atomic(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def stage_batch(staging_dir: str, pb: ProcessedBatch) -> str:
    """Write ``pb`` into ``staging_dir``; returns its path (pure I/O, no Beam)."""
    kdir = os.path.join(staging_dir, _key_dir(pb.topic, pb.partition))
    with contextlib.suppress(FileExistsError):
        os.mkdir(kdir)  # not makedirs: a task outliving its run must not recreate a removed area
    key_path = os.path.join(kdir, _KEY_FILE)
    if not os.path.exists(key_path):
        _write_atomic(key_path, orjson.dumps({"topic": pb.topic, "partition": pb.partition,
                                              "partition_start": pb.partition_start}))
    path = os.path.join(kdir, f"{pb.start_offset:020d}-{pb.end_offset:020d}{_SUFFIX}")
    _write_atomic(path, pickle.dumps(pb, protocol=pickle.HIGHEST_PROTOCOL))
    return path


class _StageFn(beam.DoFn):
    def __init__(self, staging_dir: str):
        self._staging_dir = staging_dir

    def process(self, pb: ProcessedBatch):
        stage_batch(self._staging_dir, pb)
        yield pb.read


class StageBatches(beam.PTransform):
    """PCollection[ProcessedBatch] -> PCollection[int] (records read per staged batch):
    each batch staged in ``staging_dir`` for ``StagedImporter``."""

    def __init__(self, staging_dir: str):
        super().__init__()
        self.staging_dir = staging_dir

    def expand(self, pcoll):
        return pcoll | "StageBatches" >> beam.ParDo(_StageFn(self.staging_dir))


class StagedImporter:
    """Imports staged batches into the cache in per-partition offset order, exactly once.

    ``write``: ``OrderedCacheWriter.write`` of the driver's ``CacheSession`` (it keeps the
    metrics and waits at nothing: a bounded run fails at the disk reserve)."""

    def __init__(self, staging_dir: str, cache: BatchCache, write: Callable[[ProcessedBatch], None]):
        self.staging_dir = staging_dir
        self.cache = cache
        self.write = write
        self.imported = 0
        self._keys: dict[str, tuple[str, int, int]] = {}

    def _key(self, kdir: str) -> tuple[str, int, int] | None:
        key = self._keys.get(kdir)
        if key is None:
            try:
                with open(os.path.join(self.staging_dir, kdir, _KEY_FILE), "rb") as fh:
                    doc = orjson.loads(fh.read())
            except FileNotFoundError:
                return None  # its first batch is being staged
            key = self._keys[kdir] = (doc["topic"], int(doc["partition"]), int(doc["partition_start"]))
        return key

    def _staged(self, kdir: str) -> list[tuple[int, int, str]]:
        out = []
        for name in os.listdir(os.path.join(self.staging_dir, kdir)):
            if name.endswith(_SUFFIX) and not name.startswith("."):
                start, end = name[:-len(_SUFFIX)].split("-")
                out.append((int(start), int(end), os.path.join(self.staging_dir, kdir, name)))
        return sorted(out)

    def import_ready(self) -> int:
        """Import every staged batch whose predecessor is in the cache; returns how many."""
        done = 0
        for kdir in sorted(os.listdir(self.staging_dir)):
            key = self._key(kdir)
            if key is None:
                continue
            topic, partition, partition_start = key
            for start, end, path in self._staged(kdir):
                stored_next = self.cache.next_offset(topic, partition)
                if stored_next is not None and end <= stored_next:
                    os.unlink(path)  # a range the cache holds (a retried task staged it again)
                    continue
                if start > (partition_start if stored_next is None else stored_next):
                    break  # its predecessor is not staged yet
                with open(path, "rb") as fh:
                    pb = pickle.load(fh)
                self.write(pb)
                os.unlink(path)
                done += 1
        self.imported += done
        return done

    def check_drained(self) -> None:
        """Raise CacheError naming the first batch left waiting, if any (after the run)."""
        for kdir in sorted(os.listdir(self.staging_dir)):
            key = self._key(kdir)
            staged = self._staged(kdir)
            if key is not None and staged:
                topic, partition, _ = key
                raise CacheError(
                    f"{topic}[{partition}]: {len(staged)} staged batch(es) from offset {staged[0][0]} wait for "
                    f"offset {self.cache.next_offset(topic, partition)}, which the pipeline never produced")


@contextlib.contextmanager
def staging_area(cache_path: str) -> Iterator[str]:
    """A fresh staging directory beside the cache (same file system), removed afterwards.
    Workers on other hosts need it on a shared file system."""
    parent, name = os.path.split(os.path.abspath(cache_path))
    path = tempfile.mkdtemp(prefix=f".{name}.staging-", dir=parent)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_with_import(run: Callable[[], None], importer: StagedImporter, poll_s: float = 0.05) -> None:
    """``run()`` (the pipeline, to its end) in a thread while this one imports what it
    stages. An import error ends the wait at once (the pipeline thread is a daemon: the
    process exit takes it down); a pipeline error is raised after the import of what was
    staged before it."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            run()
        except BaseException as exc:  # re-raised by the importing thread below
            failure.append(exc)

    thread = threading.Thread(target=target, name="pipeline", daemon=True)
    thread.start()
    while thread.is_alive():
        if not importer.import_ready():
            thread.join(poll_s)
    while importer.import_ready():
        pass
    if failure:
        raise failure[0]
    importer.check_drained()
    log.info("imported %d staged batches", importer.imported)
