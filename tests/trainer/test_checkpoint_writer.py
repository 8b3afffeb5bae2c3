"""The background checkpoint writer: snapshot isolation, one write in flight, errors surface."""

from __future__ import annotations

import threading

import pytest
import torch

from storage.errors import DiskFullError
from trainer.checkpoint_writer import BackgroundCheckpointWriter, snapshot


def test_snapshot_copies_tensors_and_keeps_structure():
    w = torch.arange(6.0).view(2, 3)
    blob = {"model": {"w": w}, "step": 3, "list": [w, "x"], "tuple": (1, w)}
    copy = snapshot(blob)
    w.add_(100)
    assert torch.equal(copy["model"]["w"], torch.arange(6.0).view(2, 3))
    assert copy["step"] == 3 and copy["list"][1] == "x" and isinstance(copy["tuple"], tuple)
    assert copy["list"][0].data_ptr() != w.data_ptr()


def test_written_file_is_the_state_at_submit_time(tmp_path):
    gate = threading.Event()

    def slow_save(obj, fh):
        gate.wait(10)  # training goes on while this write is held
        torch.save(obj, fh)

    writer = BackgroundCheckpointWriter(write_blob=slow_save)
    w = torch.zeros(4)
    pruned = []
    writer.submit(tmp_path / "a.pt", {"w": w}, on_written=pruned.append)
    w.add_(1.0)  # a "training step" after the snapshot
    assert writer.busy and writer.completed() == []
    assert not (tmp_path / "a.pt").exists()
    gate.set()
    assert writer.wait() == [tmp_path / "a.pt"]
    assert pruned == [tmp_path / "a.pt"]
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["w"], torch.zeros(4))


def test_submit_waits_for_the_write_in_flight(tmp_path):
    order = []

    def save(obj, fh):
        order.append(obj["n"])
        torch.save(obj, fh)

    writer = BackgroundCheckpointWriter(write_blob=save)
    for n in range(3):
        writer.submit(tmp_path / f"{n}.pt", {"n": n})
    assert writer.wait() == [tmp_path / f"{n}.pt" for n in range(3)]
    assert order == [0, 1, 2]
    assert all((tmp_path / f"{n}.pt").exists() for n in range(3))


def test_a_failed_background_write_is_raised_and_leaves_no_file(tmp_path):
    def broken(obj, fh):
        fh.write(b"partial")
        raise OSError(28, "No space left on device")

    writer = BackgroundCheckpointWriter(write_blob=broken)
    writer.submit(tmp_path / "x.pt", {"w": torch.ones(2)})
    with pytest.raises(DiskFullError, match="x.pt") as info:  # storage.atomic names the full path
        writer.wait()
    assert isinstance(info.value.__cause__, OSError) and "No space left" in str(info.value.__cause__)
    assert list(tmp_path.iterdir()) == []
    assert writer.wait() == []  # the error is reported once
