"""The one device vocabulary: what a machine offers, what each name selects, clear refusals."""

import pytest
import torch

from BrainIDLib.devices import DEVICES, LABELS, available_devices, select_device
from BrainIDLib.errors import BrainIDError


def test_offered_devices_follow_the_hardware_and_each_has_a_label():
    offered = available_devices()
    assert offered[0] == "auto" and offered[-1] == "cpu" and set(offered) <= set(DEVICES) == set(LABELS)
    assert ("cuda" in offered) == torch.cuda.is_available()
    assert ("mps" in offered) == torch.backends.mps.is_available()
    assert select_device("auto").type == next((d for d in offered if d in ("cuda", "mps")), "cpu")
    assert select_device(None) == select_device("auto") and select_device("CPU") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="needs a machine without GPU")
def test_a_missing_gpu_or_an_unknown_name_is_a_one_line_error():
    with pytest.raises(BrainIDError, match="no CUDA GPU, no Apple MPS"):
        select_device("gpu")
    with pytest.raises(BrainIDError, match="Apple MPS was requested"):
        select_device("mps")
    with pytest.raises(BrainIDError, match=r"unknown device 'tpu'; use auto .*mps"):
        select_device("tpu")
