"""Fixtures for the unit tests of the library layers (algorithms, models, tasks, config)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def single_thread():
    """Run on one intra-op thread: the tensors here are tiny, and on a shared 2-core machine torch's
    thread pool turns microsecond ops into milliseconds of spinning (a 10x slowdown measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
