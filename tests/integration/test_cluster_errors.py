"""A cluster that cannot be reached, or cannot host the workers, is one clear error, quickly."""

from __future__ import annotations

import time

import pytest
import ray

from metadist.runtime.driver import Trainer
from metadist.runtime.errors import ClusterError

# These tests check that a failed start leaves no Ray behind, so none may be running before them.
pytestmark = pytest.mark.usefixtures("no_local_ray")


def _start(cfg):
    trainer = Trainer(cfg)
    try:
        trainer.start()
    finally:
        trainer.close()


def test_unreachable_address_fails_fast(sine_debug):
    assert not ray.is_initialized()
    start = time.monotonic()
    with pytest.raises(ClusterError, match=r"runtime.address='127.0.0.1:9': nothing answers at 127.0.0.1:9"):
        _start(sine_debug("runtime.executor=ray", "runtime.address=127.0.0.1:9"))
    assert time.monotonic() - start < 30


def test_gpus_the_cluster_lacks_are_named(sine_debug):
    assert not ray.is_initialized()
    cfg = sine_debug("runtime.executor=ray", "runtime.workers=2", "runtime.gpus_per_worker=1",
                     "runtime.device=auto", "runtime.object_store_mb=100")
    with pytest.raises(ClusterError, match=r"asks for 2 CPU and 2 GPU; the Ray cluster has \d+ CPU, 0 GPU"):
        _start(cfg)
    assert not ray.is_initialized()  # the local Ray it started for the attempt is gone again


def test_the_sweeps_connection_names_its_own_key():
    from metadist.runtime.cluster import connect

    with pytest.raises(ClusterError, match=r"^address='127.0.0.1:9': nothing answers at 127.0.0.1:9 .*leave address empty"):
        connect("127.0.0.1:9", key="address")
    with pytest.raises(ClusterError, match=r"^address='nohost': expected 'auto', 'host:port' or 'ray://host:port'"):
        connect("nohost", key="address")
    assert not ray.is_initialized()
