"""The reducer cost model: pure functions, fitted by bench/reducer.py to its own measurements.

Per outer step, for P float32 values and W workers:

- driver reduce (`runtime.executor: ray`): the driver puts the parameters once, every worker fetches
  them and returns a gradient of P values, and the driver receives and adds the W results one after the
  other, so

      T_drv(W, P) = fixed + fixed_value * P + W * (worker + worker_value * P);

- ring all-reduce (`runtime.executor: collective`): every rank sends and receives 2 (W - 1) / W * 4P
  bytes, in 2 (W - 1) hops of a fixed latency each (NCCL's tree algorithms cut the hops to about
  2 log2 W; `RingCost.tree`), and nothing passes through a driver:

      T_ar(W, P) = hops(W) * hop + 2 (W - 1) / W * value * P.

Measured on one node, the driver path is fitted from its W = 1 step and the driver's serial work per
worker, measured on its own (the W = 2 step checks the fit), and the all-reduce from W = 2. `project`
extends them to many GPUs with the network and NCCL figures of `Cluster`, which are assumptions that the
caller states as such, not measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(c, d) of y = c + d x by least squares on relative errors (weights 1/y), so that a 3 ms point counts
    as much as a 300 ms one; a negative coefficient, which noise can give, is set to 0 and the other refit."""
    if len(xs) != len(ys) or len(xs) < 2 or len(set(xs)) < 2:
        raise ValueError("fit_line needs at least two distinct x values, one y per x")
    w = [1.0 / (y * y) for y in ys]  # squared weights of the relative residuals (y - c - d x) / y
    sw = sum(w)
    sx = sum(wi * x for wi, x in zip(w, xs))
    sy = sum(wi * y for wi, y in zip(w, ys))
    sxx = sum(wi * x * x for wi, x in zip(w, xs))
    sxy = sum(wi * x * y for wi, x, y in zip(w, xs, ys))
    det = sw * sxx - sx * sx
    c, d = (sxx * sy - sx * sxy) / det, (sw * sxy - sx * sy) / det
    if d < 0:
        return sy / sw, 0.0
    if c < 0:
        return 0.0, sxy / sxx
    return c, d


@dataclass(frozen=True)
class DriverCost:
    """T_drv(W, P) = fixed + fixed_value P + W (worker + worker_value P), in seconds."""

    fixed: float
    fixed_value: float
    worker: float
    worker_value: float

    @classmethod
    def fit(cls, one: dict[int, float], serial: dict[int, float]) -> "DriverCost":
        """From the step cost at W = 1 and the driver's serial cost per worker (submitting the call,
        receiving the result, adding it), each {P: seconds}: a line in P for each. The rest of the W = 1
        step (the put, one worker's side of the round trip) is the fixed part: workers on cores of their
        own do theirs in parallel."""
        ws, wv = fit_line(list(serial), list(serial.values()))
        base = {p: max(t - (ws + wv * p), 0.0) for p, t in one.items()}
        if all(t > 0 for t in base.values()):
            fs, fv = fit_line(list(base), list(base.values()))
        else:  # the serial part is all of some W = 1 step: no fixed part left to fit
            fs, fv = 0.0, 0.0
        return cls(fixed=fs, fixed_value=fv, worker=ws, worker_value=wv)

    def __call__(self, workers: int, params: float) -> float:
        return self.fixed + self.fixed_value * params + workers * (self.worker + self.worker_value * params)


@dataclass(frozen=True)
class RingCost:
    """T_ar(W, P) = hops(W) hop + 2 (W - 1) / W value P, in seconds; `value` is seconds per float32 value
    (4 bytes over the bus bandwidth)."""

    hop: float
    value: float
    tree: bool = False

    @classmethod
    def fit(cls, two: dict[int, float]) -> "RingCost":
        """From all-reduce times at W = 2, {P: seconds}: 2 hops and one gradient's bytes each way."""
        c, d = fit_line(list(two), list(two.values()))
        return cls(hop=c / 2, value=d)

    def hops(self, workers: int) -> int:
        if workers <= 1:
            return 0
        return 2 * math.ceil(math.log2(workers)) if self.tree else 2 * (workers - 1)

    def __call__(self, workers: int, params: float) -> float:
        if workers <= 1:
            return 0.0
        return self.hops(workers) * self.hop + 2 * (workers - 1) / workers * self.value * params


def crossover_params(driver: DriverCost, ring: RingCost, workers: int) -> float | None:
    """The P >= 0 at which both paths cost the same at `workers` (None if they never do); which one is the
    cheaper below it shows at P = 0."""
    a = driver(workers, 0) - ring(workers, 0)  # the driver path's extra cost at P = 0
    b = (driver(workers, 1) - driver(workers, 0)) - (ring(workers, 1) - ring(workers, 0))  # ... per value
    if b == 0 or -a / b < 0:
        return None
    return -a / b


def crossover_workers(driver, ring, params: float, max_workers: int = 4096) -> int | None:
    """The smallest W >= 2 at which the all-reduce costs less than the driver reduce; None up to max_workers."""
    for w in range(2, max_workers + 1):
        if ring(w, params) < driver(w, params):
            return w
    return None


def payback_steps(extra_start_s: float, saving_per_step_s: float) -> float:
    """Outer steps after which a path that starts `extra_start_s` slower but saves `saving_per_step_s` per
    step has caught up (inf if it saves nothing)."""
    if saving_per_step_s <= 0:
        return math.inf
    return max(extra_start_s, 0.0) / saving_per_step_s


def scaling_efficiency(local_step_s: float, step_s: float) -> float:
    """tasks/s at W over W x tasks/s in-process, when each of the W workers holds the in-process step's
    task count (weak scaling): T_local / T_W."""
    return local_step_s / step_s


@dataclass(frozen=True)
class Cluster:
    """The assumed hardware of a projection (none of it measured by the benchmark)."""

    gpus_per_node: int = 8
    nic_gbps: float = 100.0  # the driver node's network, Gb/s: workers on other nodes reach it through it
    pcie_gbytes_s: float = 20.0  # host <-> GPU copy of the parameters in and the gradient out, per worker
    nvlink_gbytes_s: float = 100.0  # NCCL all-reduce bus bandwidth within a node
    network_gbytes_s: float = 20.0  # NCCL all-reduce bus bandwidth across nodes (per GPU)
    hop_s: float = 20e-6  # NCCL latency per algorithm step
    tree: bool = True  # NCCL's tree algorithms at scale: about 2 log2 W latency steps


def project(driver: DriverCost, cluster: Cluster, workers: int, params: float) -> tuple[float, float]:
    """(driver reduce, all-reduce) seconds per step at `workers` GPUs: the driver path as measured here
    (its calls, puts and sums run on the driver's CPU wherever the workers are) plus the GPU copies and the
    gradients of workers off the driver's node through its network; the all-reduce from `cluster`'s NCCL
    figures alone (the one measured here is gloo over one node's memory)."""
    nbytes = 4.0 * params
    off_node = max(workers - cluster.gpus_per_node, 0)
    drv = driver(workers, params) + 2 * nbytes / (cluster.pcie_gbytes_s * 1e9) \
        + off_node * nbytes / (cluster.nic_gbps / 8 * 1e9)
    bus = cluster.nvlink_gbytes_s if workers <= cluster.gpus_per_node else cluster.network_gbytes_s
    ring = RingCost(hop=cluster.hop_s, value=4.0 / (bus * 1e9), tree=cluster.tree)
    return drv, ring(workers, params)
