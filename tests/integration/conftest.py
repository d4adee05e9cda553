"""A local Ray shared by the integration tests of a module: 2 CPUs, a small object store."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def local_ray():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, object_store_memory=200 * 1024 * 1024, include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()
