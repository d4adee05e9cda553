"""The in-process executor, and the unit of inner-loop work that every executor places.

`TaskShard` is one process's share of a meta-batch: its device, a model replica (structure and
BatchNorm buffers; the meta-parameters always come from the driver) and its own task source. The local
executor holds one in the driver's process, and is the reference the Ray executor is measured against;
each Ray worker actor holds one too (`metadist.runtime.ray_executor`). The maths is in
`metadist.algorithms`; nothing here computes a gradient itself.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from metadist.algorithms import algorithm_for, batching, maml_rl
from metadist.algorithms.spec import InnerSpec
from metadist.config import Config, ConfigError
from metadist.evaluation import episode_curves
from metadist.models import build_model
from metadist.runtime import memory
from metadist.tasks import build_tasks
from metadist.tasks.sinusoid import task_seed

Tensors = dict[str, torch.Tensor]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device: 'cuda' was asked for, but torch sees no CUDA device here; "
                          "allowed here: 'cpu' or 'auto'")
    return torch.device(name)


def split_tasks(tasks: int, workers: int) -> list[range]:
    """Task indices 0..tasks-1 as `workers` contiguous ranges, sizes differing by at most one."""
    base, extra = divmod(tasks, workers)
    out, start = [], 0
    for w in range(workers):
        n = base + (1 if w < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


@dataclass
class StepResult:
    """What an executor returns for one outer step: sums over the meta-batch, not means."""
    grads: Tensors
    sums: Tensors
    compute_s: float
    """Inner-loop time: the slowest worker's, measured inside the worker."""
    comm_s: float = 0.0
    """Round trip minus compute: parameter broadcast, result transfer, scheduling."""


class TaskShard:
    """The device, model replica and task source of one process, and the call that computes a shard."""

    def __init__(self, cfg: Config, rank: int = 0, world: int = 1):
        if cfg.runtime.threads:
            torch.set_num_threads(cfg.runtime.threads)
        self.cfg = cfg
        self.device = resolve_device(cfg.runtime.device)
        with torch.random.fork_rng(devices=[]):
            # Only the structure and buffers are used: the driver owns the meta-parameters.
            self.model = build_model(cfg).to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.algorithm = algorithm_for(cfg)
        self.tasks = build_tasks(cfg, rank, world)
        self._drawn = None  # (step, indices, batch) drawn to time `auto`, reused by that step's compute
        # TRPO's products and line search use the trajectories the step's meta-gradient was taken on.
        self._trpo = None  # (step, indices, maml_rl.Curvature)

    def _batch(self, step: int, indices: range):
        if self._drawn is not None and self._drawn[:2] == (step, indices):
            batch, self._drawn = self._drawn[2], None
            return batch
        cfg = self.cfg
        return self.tasks.sample(step, indices, cfg.task.shots, cfg.task.query).to(self.device)

    def _kept_batch(self, step: int, indices: range):
        """The tasks of `step`, drawn once for a measurement at start and kept for that step's compute
        (so a stream moves on as usual, and the run's first step is the one measured)."""
        batch = self._batch(step, indices)
        self._drawn = (step, indices, batch)
        return batch

    def choose_task_parallel(self, params: Tensors, step: int, spec: InnerSpec, indices: range) -> str:
        """`vmap` or `loop`, whichever computes this shard's tasks of `step` faster on this device (the
        config's `auto`). The tasks drawn for it are kept for that step, so a stream moves on as usual."""
        batch = self._kept_batch(step, indices)
        params = {k: v.to(self.device) for k, v in params.items()}
        with self._masks(step, indices):
            return batching.choose_task_parallel(self.algorithm, self.model, params, batch, spec)

    def choose_checkpoint(self, params: Tensors, step: int, spec: InnerSpec, indices: range) -> bool:
        """Whether this device needs checkpointed inner steps (the config's `inner.checkpoint: auto`): the
        peak of one task's meta-gradient at 1 and 2 inner steps is measured here, extrapolated to
        `spec.steps`, and set against the device's free memory (`metadist.runtime.memory`)."""
        if spec.steps < 2 or spec.first_order:
            return False  # nothing grows with the steps
        batch = self._kept_batch(step, indices)
        params = {k: v.to(self.device) for k, v in params.items()}
        one, peaks = batch.slice(0, 1), []
        for k in (1, 2):
            probe = spec.with_(steps=k, task_parallel="loop", checkpoint=False, report_before=False,
                               msl_weights=(1 / k,) * k if spec.msl_weights else None,
                               batches=spec.batches[:k] if spec.batches else None)
            with memory.PeakMemory(self.device) as peak, self._masks(step, indices):
                self.algorithm(self.model, params, one, probe)
            peaks.append(peak.peak)
        return memory.needs_checkpoint(*peaks, spec.steps, memory.free_bytes(self.device))

    def compute(self, params: Tensors, step: int, spec: InnerSpec, indices: range) -> tuple[Tensors, Tensors]:
        """Summed meta-gradients and metrics of tasks `indices` of outer step `step`."""
        batch = self._batch(step, indices)
        params = {k: v.to(self.device) for k, v in params.items()}
        if self.cfg.outer.optimizer == "trpo":
            grads, sums, curvature = maml_rl.trpo_start(self.model, params, batch, spec)
            self._trpo = (step, indices, curvature)
            return grads, sums
        with self._masks(step, indices):
            return self.algorithm(self.model, params, batch, spec)

    @contextmanager
    def _masks(self, step: int, indices: range):
        """DropBlock's masks come from torch's generator: within this block it is seeded by (seed, step,
        the shard's first task), so a run, a resumed run and a replaced worker draw the same masks, and
        the process's own generator (the driver's, with the local executor) is left as it was."""
        if getattr(self.model, "drop_rate", 0) == 0:
            yield
            return
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(task_seed(self.cfg.seed, "train", step, indices.start))
            yield

    def _curvature(self, params: Tensors, step: int, spec: InnerSpec, indices: range) -> maml_rl.Curvature:
        # A replaced worker has none: it samples again from the step's parameters (the trajectories are a
        # pure function of those, the seed, the step and the indices), so the products do not change.
        if self._trpo is None or self._trpo[:2] != (step, indices):
            self.compute(params, step, spec, indices)
        return self._trpo[2]

    def fvp(self, params: Tensors, step: int, spec: InnerSpec, indices: range, v: Tensors) -> Tensors:
        """TRPO: the Hessian of this shard's summed KL times `v`, at the step's parameters `params`, on
        the trajectories of the step's meta-gradient."""
        curvature = self._curvature(params, step, spec, indices)
        return curvature.fvp({k: x.to(self.device) for k, x in v.items()}, self.cfg.rl.hvp, self.cfg.rl.fd_eps)

    def surrogate(self, params: Tensors, step: int, spec: InnerSpec, indices: range,
                  candidate: Tensors) -> torch.Tensor:
        """TRPO: (this shard's summed surrogate, summed KL) at `candidate`, on the step's trajectories."""
        samples = self._curvature(params, step, spec, indices).samples
        loss, kl = maml_rl.surrogate(self.model, {k: x.to(self.device) for k, x in candidate.items()}, samples, spec)
        return torch.stack([loss, kl]).cpu()

    def eval_curves(self, params: Tensors, buffers: Tensors, split: str, indices: range, steps: int,
                    task_parallel: str) -> Tensors:
        """Per-episode evaluation curves of the fixed `split` episodes `indices`, on this device, with the
        driver's parameters and BatchNorm buffers (its running statistics), returned on the CPU."""
        self.model.load_state_dict({**self.model.state_dict(), **buffers}, strict=False)
        params = {k: v.to(self.device) for k, v in params.items()}
        curves = episode_curves(self.model, params, self.cfg, self.tasks, indices, task_parallel=task_parallel,
                                steps=steps, split=split)
        return {k: v.cpu() for k, v in curves.items()}

    def data_state(self):
        """The task stream's position (None for procedural tasks, whose position is the step)."""
        return self.tasks.state() if hasattr(self.tasks, "state") else None

    def load_data_state(self, state) -> None:
        if state is not None:
            self.tasks.load_state(state)

    def describe(self) -> dict:
        return {"device": self.device.type if self.device.type == "cpu" else torch.cuda.get_device_name(self.device),
                "threads": torch.get_num_threads()}


class LocalExecutor:
    """Every task of the meta-batch in this process: the reference executor."""

    def __init__(self, cfg: Config):
        self.shard = TaskShard(cfg)
        self.restarts = 0

    def choose_task_parallel(self, params: Tensors, step: int, spec: InnerSpec, tasks: int) -> str:
        return self.shard.choose_task_parallel(params, step, spec, range(tasks))

    def choose_checkpoint(self, params: Tensors, step: int, spec: InnerSpec, tasks: int) -> bool:
        return self.shard.choose_checkpoint(params, step, spec, range(tasks))

    def compute(self, params: Tensors, step: int, spec: InnerSpec, tasks: int) -> StepResult:
        start = time.perf_counter()
        grads, sums = self.shard.compute(params, step, spec, range(tasks))
        return StepResult(grads, sums, time.perf_counter() - start)

    def fvp(self, params: Tensors, step: int, spec: InnerSpec, tasks: int, v: Tensors) -> Tensors:
        """TRPO: the summed KL's Hessian-vector product over the meta-batch of `step`."""
        return self.shard.fvp(params, step, spec, range(tasks), v)

    def surrogate(self, params: Tensors, step: int, spec: InnerSpec, tasks: int, candidate: Tensors) -> torch.Tensor:
        """TRPO: (summed surrogate, summed KL) of the meta-batch of `step` at `candidate`."""
        return self.shard.surrogate(params, step, spec, range(tasks), candidate)

    def data_state(self) -> list:
        return [self.shard.data_state()]

    def load_data_state(self, states: list) -> None:
        self.shard.load_data_state(states[0])

    def describe(self) -> dict:
        return {"executor": "local", "workers": 1, "devices": [self.shard.describe()["device"]]}

    def close(self) -> None:
        pass
