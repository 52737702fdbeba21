"""The GPU check refuses to run without a GPU, with a message (it is run by hand on a GPU)."""

from __future__ import annotations

import sys

import pytest
import torch

from benchmarks import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_without_gpu_exits_with_a_message(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["gpu_check"])
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gpu_check.main()
