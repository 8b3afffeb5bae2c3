"""Pure parts of the cache: the write rule, trimming, Arrow encoding, key layouts."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.errors import CacheError
from storage.admission import WriteStatus, admit, check, classify, decode_batch, encode_batch
from storage.cache_keys import (
    BatchMeta,
    dead_letter_key,
    parse_dead_letter_key,
    parse_partition_key,
    partition_key,
    seq_from_key,
    seq_key,
)
from storage.dead_letters import decode_dead_letter, encode_dead_letter, reason_of
from tests.storage.builders import make_pb, row_offsets
from transforms.elements import DeadLetter, Reason, Stage


def test_classify_literal_cases():
    pb = make_pb("t", 0, 10, 20, partition_start=10)
    assert classify(pb, None) is WriteStatus.WRITTEN
    assert classify(pb, 10) is WriteStatus.WRITTEN
    assert classify(pb, 15) is WriteStatus.WRITTEN
    assert classify(pb, 20) is WriteStatus.DUPLICATE
    assert classify(pb, 9) is WriteStatus.GAP
    assert classify(make_pb("t", 0, 10, 20, partition_start=5), None) is WriteStatus.GAP


@given(start=st.integers(0, 50), size=st.integers(0, 40), nxt=st.integers(0, 100), seed=st.integers(0, 1 << 16))
def test_admit_keeps_exactly_the_offsets_at_or_after_next(start, size, nxt, seed):
    end = start + size
    offs = range(start, end)
    dead = tuple(o for o in offs if (o * 7 + seed) % 5 == 0)
    filtered = tuple(o for o in offs if (o * 3 + seed) % 4 == 0 and o not in dead)
    pb = make_pb("t", 2, start, end, dead=dead, filtered=filtered)
    if classify(pb, nxt) is not WriteStatus.WRITTEN:
        assert end <= nxt or start > nxt
        return
    adm = admit(check(pb), nxt)
    lo = max(start, nxt)
    assert adm.start_offset == lo
    assert row_offsets(adm.pb.batch) == [o for o in range(lo, end) if o not in dead and o not in filtered]
    assert [d.offset for d in adm.pb.dead_letters] == [o for o in dead if o >= lo]
    assert adm.pb.filtered_offsets.tolist() == [o for o in filtered if o >= lo]
    assert adm.read == end - lo == adm.pb.read


def test_encode_strips_only_transient_metadata_and_decodes_zero_copy():
    batch = make_pb("t", 0, 0, 5).batch
    data = encode_batch(batch)
    buf = pa.py_buffer(data)
    out = decode_batch(buf)
    assert out.schema.metadata == {b"owner": b"storage-tests"}
    assert out.equals(batch.replace_schema_metadata({b"owner": b"storage-tests"}))
    # Fixed-width column buffers point into the encoded bytes: no copy was made.
    x = out.column("x").buffers()[1]
    assert buf.address <= x.address < buf.address + buf.size


@given(topic=st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1, max_size=20),
       partition=st.integers(0, (1 << 31) - 1), offset=st.integers(0, (1 << 64) - 1), seq=st.integers(0, (1 << 64) - 1))
def test_key_layouts_round_trip(topic, partition, offset, seq):
    assert parse_partition_key(partition_key(topic, partition)) == (topic, partition)
    assert parse_dead_letter_key(dead_letter_key(topic, partition, offset)) == (topic, partition, offset)
    assert seq_from_key(seq_key(seq)) == seq


def test_seq_keys_sort_numerically():
    seqs = [0, 1, 255, 256, 65_536, 1 << 40]
    assert sorted(seqs, key=seq_key) == seqs


def test_meta_and_dead_letter_values_round_trip():
    meta = BatchMeta("file:/a b.jsonl", 3, 10, 20, 7, 999, 2, -5, 8)
    assert BatchMeta.decode(meta.encode()) == meta
    none_time = BatchMeta("t", 0, 0, 1, 1, 10, 0, None, None)
    assert BatchMeta.decode(none_time.encode()) == none_time
    dl = DeadLetter("t", 1, 42, -1, Stage.VALIDATE, Reason.NON_FINITE, "x: nan, expected finite", b"\x00\xff")
    value = encode_dead_letter(dl)
    assert reason_of(value) == "non_finite"
    assert decode_dead_letter(dead_letter_key("t", 1, 42), value) == dl


def test_unencodable_topics_are_rejected():
    for topic in ("a\x00b", "\ud800", ""):
        with pytest.raises(CacheError, match="topic"):
            check(make_pb(topic, 0, 0, 1))
