"""Joining a Ray cluster, or starting a local Ray: the one way the executors and the sweep driver connect.

The address is the configured one, else $RAY_ADDRESS (set by Ray's job server inside a submitted job),
else a local instance is started here and its owner stops it. A named address is probed first, so a
head that is not there is one error at once instead of `ray.init`'s minutes of retries.
"""

from __future__ import annotations

import os

import ray

from metadist.net import free_port, unreachable
from metadist.runtime.errors import ClusterError

# Seconds Ray Train waits for a failed collective group's ranks to shut their process group down before
# it restarts the group. Its default, 30, is pure loss when a rank hangs (stopped, or stuck in a
# collective): that rank never answers. A healthy group shuts down in well under a second. The
# variable is read by Ray Train's controller, which inherits the environment of the Ray it runs in: a
# local Ray started here gets it from this process; cluster/start-head.sh and the cluster files set it
# on a head. (A job-level runtime_env would carry it too, but then no worker could come from Ray's pool
# of prestarted workers: every actor and trial would start a process of its own.)
SHUTDOWN_TIMEOUT = ("TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S", "10")
# A Ray started here is this one machine: none of its nodes can be preempted, and Ray Train's preemption
# watcher would only be one more process to start (2 s of CPU here) for every collective group.
NO_PREEMPTION = ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
STATE_API = "RAY_API_SERVER_ADDRESS"


def connect(address: str | None, *, key: str = "runtime.address", num_cpus: int | None = None,
            num_gpus: int | None = None, object_store_mb: int | None = None, dashboard: bool = False,
            log_to_driver: bool = True) -> bool:
    """Make sure this process is connected to Ray; True if it started the instance (and must stop it).

    `key` names the config key of `address` in errors. The other arguments size and shape a local
    instance (`num_cpus` defaults to this machine's cores); `log_to_driver` applies to joining too.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address, key)
        try:
            ray.init(address=address, configure_logging=False, log_to_driver=log_to_driver)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ClusterError(f"{key}={address!r}: could not join the Ray cluster "
                               f"({str(err).splitlines()[0][:300]})") from None
        return False
    # address="local": a new instance, as `runtime.address` documents, never a cluster that `ray start`
    # left running on this machine (which a bare ray.init() would join).
    for name, value in (SHUTDOWN_TIMEOUT, NO_PREEMPTION):  # before the raylet starts: its workers inherit them
        os.environ.setdefault(name, value)
    # The state API of this Ray, and of no other. Ray Train's placement-group cleaner asks it whether a
    # run's controller still lives, finding it through the dashboard address the Ray records, or through
    # whichever Ray it finds on the machine. With another Ray on this machine (a head, a sweep, a second
    # run) that answers "no such actor" for a healthy run, and the cleaner removed the run's placement
    # group (its ranks died); or it finds no single Ray, and never removes the group of a controller that
    # did die (a sweep's stopped trial), so the next trial waits for its CPUs for ever. So the Ray gets a
    # dashboard port of its own, and its processes the address of its state API (RAY_API_SERVER_ADDRESS,
    # which comes first). With no dashboard nothing answers there, and the cleaner only waits.
    port = free_port()
    before = os.environ.get(STATE_API)
    os.environ[STATE_API] = f"http://127.0.0.1:{port}"  # for the Ray's processes, not for this one's clients
    try:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, num_gpus=num_gpus,
                 object_store_memory=object_store_mb * 1024 * 1024 if object_store_mb else None,
                 include_dashboard=dashboard, dashboard_host="127.0.0.1", dashboard_port=port,
                 configure_logging=False, log_to_driver=log_to_driver)
    finally:
        if before is None:
            os.environ.pop(STATE_API)
        else:
            os.environ[STATE_API] = before
    return True


def check_reachable(address: str, key: str = "runtime.address", timeout: float = 5.0) -> None:
    """Fail fast, instead of ray.init's long retries, when host:port does not answer at all."""
    if address == "auto":
        return
    try:
        silent = unreachable(address, timeout=timeout)
    except ValueError:
        raise ClusterError(f"{key}={address!r}: expected 'auto', 'host:port' or 'ray://host:port'") from None
    if silent:
        raise ClusterError(f"{key}={address!r}: {silent}; start a head with cluster/start-head.sh, or leave "
                           f"{key} empty for a local Ray")
