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


@pytest.fixture(autouse=True)
def no_ray_in_this_process():
    """Unit tests run with no Ray in their process. Under pytest-xdist a worker can come to them after
    the integration tests' shared local Ray, which `cluster.connect` would then reuse whatever address a
    test gives it."""
    import sys

    if "ray" in sys.modules:  # never imported here just to ask
        import ray

        if ray.is_initialized():
            ray.shutdown()
