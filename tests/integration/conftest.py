"""One local Ray shared by every integration test that needs one (2 CPUs, a small object store), and a
guard for the modules whose commands start Ray processes of their own."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def local_ray():
    """The in-process local Ray: started once for the session (again after `no_local_ray` stopped it)."""
    import ray

    from metadist.runtime.cluster import connect

    # Starting Ray costs about 10 s here: modules share this instance rather than each starting one. It
    # is started as metadist starts one (its job environment included), sized for the tests.
    connect(None, num_cpus=2, object_store_mb=200, dashboard=False, log_to_driver=False)
    yield ray
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def no_local_ray():
    """Stop the shared Ray before a module whose commands start their own Ray (a head, `metadist tune`):
    two local clusters on 2 CPUs would compete, and a new process might join the wrong one."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
