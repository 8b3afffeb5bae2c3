"""``[trainer] max_batch_wait_ms``: partial batches cut on a (fake) clock, recorded, and
honoured by every later reading so batch boundaries do not depend on timing."""

from __future__ import annotations

import pytest

from engine.config import config_from_dict
from tests.trainer.test_trainer_data import LAYOUT, make_stream, rows_of
from trainer.data import WAIT_EXPIRED, Cursor, TimedCuts, TrainingStream, _WaitTimer, rebatch


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class MemoryCutLog:
    """The two methods of ``BatchCache`` the stream uses, in memory."""

    def __init__(self, cuts=()):
        self.cuts = sorted(cuts)
        self.recorded_at: list[float] = []
        self.clock = None

    def train_cuts(self, start_seq: int = 0):
        return [c for c in self.cuts if c[0] >= start_seq]

    def record_train_cut(self, seq: int, row: int) -> None:
        self.cuts = sorted(set(self.cuts) | {(seq, row)})
        if self.clock is not None:
            self.recorded_at.append(self.clock())


def test_wait_expired_cuts_pending_rows_records_the_cut_and_replay_honours_it():
    stream = make_stream([5, 3, 70, 2, 9])
    recorded = []
    timer = _WaitTimer(1000, FakeClock())
    source = [stream[0], WAIT_EXPIRED, stream[1], stream[2], stream[3], WAIT_EXPIRED, WAIT_EXPIRED, stream[4]]
    items = list(rebatch(source, LAYOUT, 64, timer=timer, record_cut=recorded.append))
    assert [i.batch.batch_size for i in items] == [5, 64, 11, 9]
    assert recorded == [Cursor(0, 5), Cursor(3, 2)]  # an expiry with nothing pending cuts nothing
    assert sum((rows_of(i) for i in items), []) == list(range(89))

    # Reading the same cache again (no clock) with the recorded cuts gives the same batches,
    # also when resuming from a cursor taken after any item.
    replay = list(rebatch(make_stream([5, 3, 70, 2, 9]), LAYOUT, 64, cuts=recorded))
    assert [(i.cursor, rows_of(i)) for i in replay] == [(i.cursor, rows_of(i)) for i in items]
    for k, item in enumerate(items[:-1]):
        resumed = list(rebatch(make_stream([5, 3, 70, 2, 9]), LAYOUT, 64, start=item.cursor, cuts=recorded))
        assert [rows_of(i) for i in resumed] == [rows_of(i) for i in items[k + 1:]]


def test_recorded_cut_inside_a_cached_batch_splits_it():
    items = list(rebatch(make_stream([10, 10]), LAYOUT, 64, cuts=[Cursor(0, 4), Cursor(1, 7)]))
    assert [rows_of(i) for i in items] == [list(range(4)), list(range(4, 17)), list(range(17, 20))]
    assert [i.cursor for i in items] == [Cursor(0, 4), Cursor(1, 7), Cursor(1, 10)]


def test_stream_cuts_exactly_when_the_first_row_has_waited_max_batch_wait():
    """A follow source that delivers batches, then waits (polling ``stop``) while the fake
    clock runs: each partial batch is cut at first-row time + the wait, no later."""
    clock = FakeClock()
    log = MemoryCutLog()
    log.clock = clock
    arrivals = {0: 0.0, 1: 0.2, 2: 5.0}  # seconds after start at which each batch is written
    batches = make_stream([3, 4, 6])
    first_row_at = {}

    def open_batches(start_seq, stop):
        for seq in range(start_seq, len(batches)):
            while clock.now - 100.0 < arrivals[seq]:  # waiting for the writer
                if stop():
                    return
                clock.now = round(clock.now + 0.01, 6)
            first_row_at.setdefault(seq, clock.now)
            yield batches[seq]
        while not stop():  # the tail: nothing more arrives
            clock.now = round(clock.now + 0.01, 6)

    stream = TrainingStream(open_batches, LAYOUT, 64, prefetch_batches=0,
                            timed_cuts=TimedCuts(log, 1500, clock))
    got = []
    for item in stream:
        got.append((rows_of(item), item.cursor))
        if len(got) == 2:
            stream.close()
    assert got == [(list(range(7)), Cursor(1, 4)), (list(range(7, 13)), Cursor(2, 6))]
    assert log.cuts == [(1, 4), (2, 6)]
    # cut 1.5 s after the batch's first row (batch 0), not after its last one (batch 1)
    assert log.recorded_at == pytest.approx([first_row_at[0] + 1.5, first_row_at[2] + 1.5])
    assert not stream.look_ahead_ok


def test_timed_cuts_off_or_bounded():
    log = MemoryCutLog([(0, 2)])
    assert TimedCuts.for_trainer(0, log, follow=True) is None
    bounded = TimedCuts.for_trainer(250, log, follow=False)
    assert bounded.max_wait_ms == 0  # honours recorded cuts, makes none
    stream = TrainingStream(lambda s, stop: iter(make_stream([5])[s:]), LAYOUT, 64, prefetch_batches=0,
                            timed_cuts=bounded)
    assert [rows_of(i) for i in stream] == [[0, 1], [2, 3, 4]]
    assert stream.look_ahead_ok


def test_max_batch_wait_ms_config():
    doc = {"schema": {"dense": [{"name": "x"}]}, "trainer": {"bottom_mlp": [16]}}
    assert config_from_dict(doc).trainer.max_batch_wait_ms == 0
    doc["trainer"]["max_batch_wait_ms"] = -1
    with pytest.raises(Exception, match="max_batch_wait_ms"):
        config_from_dict(doc)


def test_multi_rank_jobs_reject_timed_cuts():
    from trainer.distributed_loop import require_sharding_for

    cfg = config_from_dict({"schema": {"dense": [{"name": "x"}]}, "sharding": {"enabled": True},
                            "trainer": {"bottom_mlp": [16], "max_batch_wait_ms": 100}})
    require_sharding_for(cfg, 1)
    with pytest.raises(Exception, match="max_batch_wait_ms"):
        require_sharding_for(cfg, 2)
