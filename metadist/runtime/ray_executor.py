"""The Ray executor: worker actors each compute the meta-gradient of their share of the meta-batch.

Per outer step the driver flattens the meta-parameters into one numpy buffer, puts it in the object
store once, and sends every worker the reference, the step and its task indices. A worker draws its
own tasks, calls `metadist.algorithms` through its `TaskShard`, and returns the summed meta-gradients
as one flat numpy buffer, its metrics and its compute time. numpy buffers travel zero-copy within a
node, where pickled torch tensors are copied through the serializer. The driver adds the results in
worker order (so the same seed and worker count give bit-identical results), and the trainer divides
by the task count.

A worker that dies mid-step (its process killed, its node lost) is replaced by a new actor in the same
placement-group bundle, and its tasks of that step are computed again: procedural tasks are a pure
function of (seed, step, index), so the result is unchanged. `restarts` counts replacements.

Workers are created in one placement group, so the cluster reserves them all at once or not at all;
inside a Ray Tune trial the trial's own placement group (bundle 0 for the trial, 1..W for workers) is
used instead.
"""

from __future__ import annotations

import os
import socket
import time
import warnings

import numpy as np
import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from rich.console import Console

from metadist.algorithms.spec import InnerSpec
from metadist.config import Config, from_dict, to_dict
from metadist.errors import UserError
from metadist.evaluation import join_curves
from metadist.runtime import cluster
from metadist.runtime.errors import ClusterError
from metadist.runtime.flat import Layout
from metadist.runtime.local import StepResult, TaskShard, split_tasks

Tensors = dict[str, torch.Tensor]


def readonly_view(array: np.ndarray) -> torch.Tensor:
    """A tensor over a worker's result in the object store, without a copy: it is only read (summed)."""
    with warnings.catch_warnings():  # torch warns that it cannot mark the tensor read-only
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


class MetaWorker:
    """A worker actor: holds a TaskShard (device, model replica, task source) and places work on it."""

    def __init__(self, cfg: dict, layout: Layout, rank: int, world: int):
        self.rank = rank
        self.layout = layout
        self.shard = TaskShard(from_dict(cfg), rank=rank, world=world)

    def compute(self, flat_params: np.ndarray, step: int, spec: InnerSpec, indices: range):
        """(flat summed gradients as numpy, summed metrics, compute seconds, task stream position after
        the step)."""
        start = time.perf_counter()
        grads, sums = self.shard.compute(self._params(flat_params), step, spec, indices)
        flat = self.layout.flatten(grads).cpu()  # .cpu() waits for an accelerator's kernels
        return flat.numpy(), {k: v.cpu() for k, v in sums.items()}, time.perf_counter() - start, \
            self.shard.data_state()

    def choose_task_parallel(self, flat_params: np.ndarray, step: int, spec: InnerSpec, indices: range) -> str:
        return self.shard.choose_task_parallel(self._params(flat_params), step, spec, indices)

    def choose_checkpoint(self, flat_params: np.ndarray, step: int, spec: InnerSpec, indices: range) -> bool:
        return self.shard.choose_checkpoint(self._params(flat_params), step, spec, indices)

    def fvp(self, flat_params: np.ndarray, step: int, spec: InnerSpec, indices: range, flat_v: np.ndarray) -> np.ndarray:
        """TRPO: this worker's summed-KL Hessian-vector product on its tasks of `step`, flat."""
        hv = self.shard.fvp(self._params(flat_params), step, spec, indices, self._params(flat_v))
        return self.layout.flatten(hv).cpu().numpy()

    def surrogate(self, flat_params: np.ndarray, step: int, spec: InnerSpec, indices: range,
                  flat_candidate: np.ndarray) -> torch.Tensor:
        """TRPO: (summed surrogate, summed KL) of this worker's tasks of `step` at the candidate."""
        return self.shard.surrogate(self._params(flat_params), step, spec, indices, self._params(flat_candidate))

    def eval_curves(self, flat_params: np.ndarray, buffers: Tensors, split: str, indices: range, steps: int,
                    task_parallel: str) -> Tensors:
        """This worker's share of an evaluation: per-episode curves of the fixed episodes `indices`."""
        return self.shard.eval_curves(self._params(flat_params), buffers, split, indices, steps, task_parallel)

    def _params(self, flat_params: np.ndarray) -> Tensors:
        # The array is the object store's read-only, zero-copy buffer; one copy makes it the worker's own
        # (memcpy speed: milliseconds for 50 MB), so nothing downstream can write into shared memory.
        return self.layout.unflatten(torch.from_numpy(flat_params.copy()))

    def load_data_state(self, state) -> None:
        self.shard.load_data_state(state)

    def info(self) -> dict:
        return {"rank": self.rank, "pid": os.getpid(), "node": socket.gethostname(), **self.shard.describe()}


def _get(ref):
    """`ray.get`, except that a user error a worker raised (bad data, say) is raised as itself: the user's
    one line, not Ray's task error carrying the worker's traceback."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, UserError):
            raise err.cause from None
        raise


def connect_for(cfg: Config, dashboard: bool = False) -> bool:
    """Connect to the configured cluster, or start a local Ray sized for the workers; True if started here."""
    rt = cfg.runtime
    # A local instance sized for the workers plus the driver; fractional CPUs place more workers
    # than cores when asked to.
    cpus = max(os.cpu_count() or 1, int(rt.workers * rt.cpus_per_worker + 0.999))
    return cluster.connect(rt.address, num_cpus=cpus,
                           num_gpus=torch.cuda.device_count() if rt.gpus_per_worker else None,
                           object_store_mb=rt.object_store_mb, dashboard=dashboard)


def check_resources(cfg: Config) -> None:
    rt = cfg.runtime
    total = ray.cluster_resources()
    want = {"CPU": rt.workers * rt.cpus_per_worker, "GPU": rt.workers * rt.gpus_per_worker}
    short = {k: v for k, v in want.items() if v > total.get(k, 0.0) + 1e-9}
    if short:
        have = ", ".join(f"{total.get(k, 0):g} {k}" for k in ("CPU", "GPU"))
        asked = " and ".join(f"{v:g} {k}" for k, v in want.items() if v)
        raise ClusterError(f"runtime.workers={rt.workers} with cpus_per_worker={rt.cpus_per_worker:g}, "
                           f"gpus_per_worker={rt.gpus_per_worker:g} asks for {asked}; the Ray cluster has "
                           f"{have} in all")


class RayExecutor:
    """`runtime.workers` actors, one device each, and the driver-side reduce."""

    def __init__(self, cfg: Config, layout: Layout, console: Console | None = None):
        self.cfg = cfg
        self.console = console or Console(stderr=True)
        self.owns_ray = connect_for(cfg)
        self.restarts = 0
        self.after_submit = None  # test hook: called with (step, actors) once a step's work is submitted
        self.layout = layout  # the driver's parameter names and shapes, for the flat transport
        try:
            self.pg, self.bundle0, self.owns_pg = self._placement()
            self.actors = [self._start(rank) for rank in range(cfg.runtime.workers)]
            self.infos = ray.get([a.info.remote() for a in self.actors])
            self.data_states = [None] * len(self.actors)
        except BaseException:
            self.close()
            raise
        devices = sorted({i["device"] for i in self.infos})
        self.console.log(f"ray: {len(self.actors)} worker(s) on {', '.join(devices)}")

    # -- placement ------------------------------------------------------------------------------
    def _placement(self) -> tuple[PlacementGroup, int, bool]:
        current = ray.util.get_current_placement_group()
        if current is not None:  # inside a Tune trial: its placement group already holds our bundles
            return current, 1, False
        check_resources(self.cfg)
        rt = self.cfg.runtime
        bundle = {"CPU": rt.cpus_per_worker, **({"GPU": rt.gpus_per_worker} if rt.gpus_per_worker else {})}
        pg = placement_group([dict(bundle) for _ in range(rt.workers)], strategy="PACK")
        ready, _ = ray.wait([pg.ready()], timeout=rt.placement_timeout_s)
        if not ready:
            remove_placement_group(pg)
            raise ClusterError(f"the cluster did not reserve {rt.workers} worker(s) of {bundle} within "
                               f"{rt.placement_timeout_s:g} s; other jobs may hold the resources "
                               f"(see `ray status`)")
        return pg, 0, True

    def _start(self, rank: int):
        rt = self.cfg.runtime
        actor_cls = ray.remote(MetaWorker).options(
            num_cpus=rt.cpus_per_worker, num_gpus=rt.gpus_per_worker,
            # A dead worker is replaced by a fresh actor, not restarted by Ray: its bundle is then
            # free for the replacement, and the driver knows exactly which step's tasks to recompute.
            max_restarts=0, max_task_retries=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=self.bundle0 + rank))
        return actor_cls.remote(to_dict(self.cfg), self.layout, rank, self.cfg.runtime.workers)

    def _replace(self, rank: int, err: Exception) -> None:
        self.restarts += 1
        if self.restarts > self.cfg.runtime.max_worker_restarts:
            raise ClusterError(f"worker {rank} died and runtime.max_worker_restarts="
                               f"{self.cfg.runtime.max_worker_restarts} replacements are used up "
                               f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
        self.console.log(f"worker {rank} died ({type(err).__name__}); replacing it and recomputing its tasks")
        try:
            ray.kill(self.actors[rank], no_restart=True)
        except Exception:  # already gone; nothing to free
            pass
        self.actors[rank] = self._start(rank)
        # The replacement continues the dead worker's task stream from where this step began.
        ray.get(self.actors[rank].load_data_state.remote(self.data_states[rank]))
        self.infos[rank] = ray.get(self.actors[rank].info.remote())

    # -- one step -------------------------------------------------------------------------------
    def choose_task_parallel(self, params: Tensors, step: int, spec: InnerSpec, tasks: int) -> str:
        """`auto`, resolved once for the run: worker 0 times both modes on its share of step `step`, on
        its own device, and every worker then runs the mode it chose."""
        share = split_tasks(tasks, len(self.actors))[0]
        return _get(self.actors[0].choose_task_parallel.remote(self._flat(params), step, spec, share))

    def choose_checkpoint(self, params: Tensors, step: int, spec: InnerSpec, tasks: int) -> bool:
        """`inner.checkpoint: auto`, resolved once for the run by worker 0 on its share and its device."""
        share = split_tasks(tasks, len(self.actors))[0]
        return _get(self.actors[0].choose_checkpoint.remote(self._flat(params), step, spec, share))

    def compute(self, params: Tensors, step: int, spec: InnerSpec, tasks: int) -> StepResult:
        start = time.perf_counter()
        ref = ray.put(self._flat(params))  # once per step, shared by every worker
        results = self._on_workers(split_tasks(tasks, len(self.actors)),
                                   lambda actor, share: actor.compute.remote(ref, step, spec, share), step)
        total, sums = None, {}
        for rank in sorted(results):  # a fixed order: same seed and W give bit-identical sums
            flat, metrics, _, self.data_states[rank] = results[rank]
            flat = readonly_view(flat)
            total = flat.clone() if total is None else total.add_(flat)
            for k, v in metrics.items():
                sums[k] = sums[k] + v if k in sums else v
        compute_s = max(r[2] for r in results.values())
        wall = time.perf_counter() - start
        return StepResult(self.layout.unflatten(total), sums, compute_s, max(wall - compute_s, 0.0))

    def fvp(self, params: Tensors, step: int, spec: InnerSpec, tasks: int, v: Tensors) -> Tensors:
        """TRPO: the summed KL's Hessian-vector product over the meta-batch of `step`, each worker on the
        trajectories it sampled for the step's meta-gradient (a replaced worker samples them again)."""
        ref, vref = ray.put(self._flat(params)), ray.put(self._flat(v))
        results = self._on_workers(split_tasks(tasks, len(self.actors)),
                                   lambda actor, share: actor.fvp.remote(ref, step, spec, share, vref))
        total = None
        for rank in sorted(results):  # a fixed order, as for the gradients
            flat = readonly_view(results[rank])
            total = flat.clone() if total is None else total.add_(flat)
        return self.layout.unflatten(total)

    def surrogate(self, params: Tensors, step: int, spec: InnerSpec, tasks: int, candidate: Tensors) -> torch.Tensor:
        """TRPO: (summed surrogate, summed KL) over the meta-batch of `step` at `candidate`."""
        ref, cref = ray.put(self._flat(params)), ray.put(self._flat(candidate))
        results = self._on_workers(split_tasks(tasks, len(self.actors)),
                                   lambda actor, share: actor.surrogate.remote(ref, step, spec, share, cref))
        return sum(results[rank] for rank in sorted(results))

    def eval_curves(self, params: Tensors, buffers: Tensors, split: str, episodes: int, steps: int,
                    task_parallel: str) -> Tensors:
        """The per-episode curves of the fixed `split` episodes 0..episodes-1: each worker adapts its share
        (split by index) on its own device; the shares are joined in episode order."""
        ref = ray.put(self._flat(params))
        buffers = {k: v.cpu() for k, v in buffers.items()}
        results = self._on_workers(
            split_tasks(episodes, len(self.actors)),
            lambda actor, share: actor.eval_curves.remote(ref, buffers, split, share, steps, task_parallel))
        return join_curves([results[rank] for rank in sorted(results)])

    def _on_workers(self, shares: list[range], submit, step: int | None = None) -> dict:
        """`submit(actor, share)` for every worker with a non-empty share; their results by rank. A worker
        that dies is replaced and its share submitted again (its tasks are recomputed, not lost)."""
        pending = {submit(self.actors[rank], share): (rank, share) for rank, share in enumerate(shares) if len(share)}
        if self.after_submit is not None and step is not None:
            self.after_submit(step, self)
        results = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            rank, share = pending.pop(done[0])
            try:
                results[rank] = _get(done[0])
            except ray.exceptions.RayActorError as err:
                self._replace(rank, err)
                pending[submit(self.actors[rank], share)] = (rank, share)
        return results

    def _flat(self, params: Tensors) -> np.ndarray:
        # numpy, not a torch tensor: Ray stores it as one zero-copy buffer that workers on this node map
        # instead of unpickling. The driver reduce measured by bench/reducer.py on 2 cores: about 3x
        # faster than with torch tensors from 4M parameters up (docs/scaling.md).
        return self.layout.flatten(params).cpu().numpy()

    # -- around ---------------------------------------------------------------------------------
    def data_state(self) -> list:
        """Each worker's task stream position after the last step (None entries: procedural tasks)."""
        return list(self.data_states)

    def load_data_state(self, states: list) -> None:
        if len(states) != len(self.actors):
            raise ClusterError(f"the checkpoint holds {len(states)} worker streams; this run has "
                               f"{len(self.actors)} workers")
        ray.get([a.load_data_state.remote(s) for a, s in zip(self.actors, states)])
        self.data_states = list(states)

    def pids(self) -> list[int]:
        return [i["pid"] for i in self.infos]

    def describe(self) -> dict:
        infos = self.infos
        return {"executor": "ray", "workers": len(self.actors), "ray_version": ray.__version__,
                "devices": sorted({i["device"] for i in infos}), "nodes": len({i["node"] for i in infos})}

    def close(self) -> None:
        """Stop the workers, free their placement group, and stop Ray if this executor started it."""
        if not ray.is_initialized():
            return
        for actor in getattr(self, "actors", []):
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.actors = []
        if getattr(self, "owns_pg", False):
            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
            self.owns_pg = False
        if self.owns_ray:
            ray.shutdown()
            self.owns_ray = False
