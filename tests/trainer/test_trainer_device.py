"""trainer.device: config device strings -> torch devices, with clear errors."""

import pytest
import torch

from engine.errors import TrainerError
from trainer.device import resolve_device


def test_auto_and_cpu():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("CPU") == torch.device("cpu")


def test_missing_cuda_device_is_named():
    index = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(TrainerError, match=rf"'cuda:{index}' but {index} CUDA device"):
        resolve_device(f"cuda:{index}")


@pytest.mark.parametrize("spec", ["tpu", "gpu0", "meta"])
def test_unsupported_devices(spec):
    with pytest.raises(TrainerError, match="trainer.device"):
        resolve_device(spec)
