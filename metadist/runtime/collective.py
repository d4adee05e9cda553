"""The collective executor: Ray Train ranks that all-reduce their meta-gradients among themselves.

With `runtime.executor: collective`, `Trainer.fit` hands the run to a Ray Train V2 `TorchTrainer` of
`runtime.workers` ranks (gloo on CPU, nccl on GPU). Every rank runs the driver's own outer loop
(`Trainer.fit`, not a copy of it) with a `CollectiveExecutor`: it computes the summed meta-gradients
and metrics of its share of the meta-batch through its `TaskShard`, as an actor does, all-reduces them
as one flat tensor with `torch.distributed.all_reduce`, and takes the same outer step as every other
rank. No parameter or gradient passes through the driver or the object store. DDP is not used: its
hooks do not fire for `torch.autograd.grad`.

Every rank starts from the same state: the driver writes it to `start.pt` in the run folder (the
initial parameters, or the checkpoint of a resumed run) and each rank loads it, so the ranks' parameters
are identical from the first step on, and the identical all-reduced gradient keeps them so.

Rank 0 is the run's main process: it writes the run folder (checkpoints in the format every executor
uses, metrics.jsonl, eval.json, summary.json) and is the one process that talks to MLflow, live, as
the run goes. Its MLflow run id is kept in the run folder, so a restarted group continues the same run.

Faults: a rank that dies, or hangs past `runtime.collective_timeout_s` in a collective, fails the group;
Ray Train restarts it (`FailureConfig.max_failures` = `runtime.max_worker_restarts`) and every rank
resumes from the last checkpoint it reported to Ray Train (at `train.checkpoint_every`). Errors that a
restart cannot cure (a diverged inner loop, bad data) end the group at once instead, and the driver
raises them as it would on any executor.

The run folder must be reachable from every rank's node under the same path: one machine, or a shared
file system.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import TorchConfig, TorchTrainer
from rich.console import Console

from metadist.algorithms.spec import InnerSpec
from metadist.config import Config, ConfigError, dump_config, from_dict, to_dict
from metadist.data.format import DataError
from metadist.errors import UserError
from metadist.evaluation import join_curves, print_eval
from metadist.runtime.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, write_text_atomically
from metadist.runtime.errors import ClusterError, TrainingDiverged
from metadist.runtime.flat import Layout
from metadist.runtime.local import StepResult, TaskShard, split_tasks
from metadist.runtime.ray_executor import check_resources, connect_for

Tensors = dict[str, torch.Tensor]

START, SUMMARY, ERROR, RUN_ID, STARTS, RANKS, PROGRESS = (
    "start.pt", "summary.json", "error.json", "mlflow_run_id", "group_starts", "ranks.json", "progress.json")
# The user errors a rank may end the group with, raised again in the driver under their own type.
_ERRORS = {cls.__name__: cls for cls in (TrainingDiverged, ConfigError, CheckpointError, ClusterError, DataError)}


class CollectiveExecutor:
    """One rank's share of every step: its TaskShard, and the all-reduce that makes the sums global."""

    def __init__(self, cfg: Config, rank: int, world: int, restarts: int = 0):
        self.rank, self.world = rank, world
        self.shard = TaskShard(cfg, rank=rank, world=world)
        self.device = self.shard.device
        self.restarts = restarts  # group restarts within this fit() (Ray Train restarted every rank)
        # Metrics that go with the checkpoint reports while set: a sweep trial's validation, which Ray
        # Train keeps from rank 0 and the trial's TuneReportCallback forwards to Tune.
        self.report_metrics: dict = {}
        info = {"rank": rank, "pid": os.getpid(), "node": socket.gethostname(), **self.shard.describe()}
        self.infos: list = [None] * world
        dist.all_gather_object(self.infos, info)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def choose_task_parallel(self, params: Tensors, step: int, spec: InnerSpec, tasks: int) -> str:
        """`auto`: every rank times both modes on its own share at once (so none waits in a collective for
        another's timing), and every rank takes rank 0's choice."""
        share = split_tasks(tasks, self.world)[self.rank]
        choice = [self.shard.choose_task_parallel(params, step, spec, share)]
        dist.broadcast_object_list(choice, src=0)
        return choice[0]

    def choose_checkpoint(self, params: Tensors, step: int, spec: InnerSpec, tasks: int) -> bool:
        """`inner.checkpoint: auto`: every rank measures its own share at once, and takes rank 0's answer."""
        share = split_tasks(tasks, self.world)[self.rank]
        choice = [self.shard.choose_checkpoint(params, step, spec, share)]
        dist.broadcast_object_list(choice, src=0)
        return choice[0]

    def compute(self, params: Tensors, step: int, spec: InnerSpec, tasks: int) -> StepResult:
        start = time.perf_counter()
        grads, sums = self.shard.compute(params, step, spec, split_tasks(tasks, self.world)[self.rank])
        compute_s = time.perf_counter() - start
        # The gradients and the metric sums as one flat tensor: one collective per step. The sums travel
        # in the gradients' dtype (counts stay exact far beyond any meta-batch size); their keys, which
        # differ between logging steps and others, are the same on every rank at a given step.
        dtype = next(iter(grads.values())).dtype
        both = {**{f"grad/{k}": v for k, v in grads.items()},
                **{f"sum/{k}": sums[k].to(dtype) for k in sorted(sums)}}
        layout = Layout.of(both)
        flat = layout.flatten(both)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        total = layout.unflatten(flat)
        wall = time.perf_counter() - start
        return StepResult({k: total[f"grad/{k}"] for k in grads},
                          {k: total[f"sum/{k}"].to(sums[k].dtype) for k in sums}, compute_s,
                          max(wall - compute_s, 0.0))

    def fvp(self, params: Tensors, step: int, spec: InnerSpec, tasks: int, v: Tensors) -> Tensors:
        """TRPO: the summed KL's Hessian-vector product over the meta-batch of `step`: this rank's share on
        its trajectories of the step, all-reduced; a collective call."""
        share = split_tasks(tasks, self.world)[self.rank]
        hv = self.shard.fvp(params, step, spec, share, v)
        layout = Layout.of(hv)
        flat = layout.flatten(hv)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        return layout.unflatten(flat)

    def surrogate(self, params: Tensors, step: int, spec: InnerSpec, tasks: int, candidate: Tensors) -> torch.Tensor:
        """TRPO: (summed surrogate, summed KL) over the meta-batch of `step` at `candidate`; a collective call."""
        both = self.shard.surrogate(params, step, spec, split_tasks(tasks, self.world)[self.rank], candidate)
        both = both.to(self.device)
        dist.all_reduce(both, op=dist.ReduceOp.SUM)
        return both.cpu()

    def eval_curves(self, params: Tensors, buffers: Tensors, split: str, episodes: int, steps: int,
                    task_parallel: str) -> Tensors:
        """The per-episode curves of the fixed `split` episodes 0..episodes-1: this rank adapts its share
        (split by index) on its device, and every rank gathers every share, in episode order; a
        collective call."""
        share = split_tasks(episodes, self.world)[self.rank]
        mine = self.shard.eval_curves(params, buffers, split, share, steps, task_parallel) if len(share) else {}
        parts: list = [None] * self.world
        dist.all_gather_object(parts, mine)  # (episodes x steps) floats per rank: small next to a gradient
        return join_curves(parts)

    def data_state(self) -> list:
        """Every rank's task stream position (None entries: procedural tasks); a collective call."""
        states: list = [None] * self.world
        dist.all_gather_object(states, self.shard.data_state())
        return states

    def load_data_state(self, states: list) -> None:
        if len(states) != self.world:
            raise ClusterError(f"the checkpoint holds {len(states)} worker streams; this run has "
                               f"{self.world} ranks")
        self.shard.load_data_state(states[self.rank])

    def checkpoint_saved(self, path: Path | None, step: int) -> None:
        """Report the checkpoint rank 0 just wrote to Ray Train, which restarts a failed group from it.
        Every rank calls this (Ray Train's report is a barrier); only rank 0 hands over a checkpoint."""
        metrics = {"step": step, **self.report_metrics}
        if path is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:  # Ray Train copies the folder into its storage
            shutil.copyfile(path, Path(folder) / "checkpoint.pt")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    def describe(self) -> dict:
        return {"executor": "collective", "workers": self.world, "ray_version": ray.__version__,
                "devices": sorted({i["device"] for i in self.infos}),
                "nodes": len({i["node"] for i in self.infos})}

    def close(self) -> None:
        pass  # Ray Train tears the process group down when the rank's function returns


# -- in each rank ---------------------------------------------------------------------------------------
def rank_main(config: dict) -> None:
    """The function every Ray Train rank runs: the outer loop on this rank's share of each step."""
    from metadist.runtime.driver import Callback, Every, Trainer, drop_records_after

    # A line per report and checkpoint would drown the run's output. Ray Train's report logger is named
    # by its module's file, not under "ray.train".
    from ray.train.v2._internal.execution import context as train_context

    for logger in (logging.getLogger("ray.train"), logging.getLogger("ray.tune"), train_context.logger):
        logger.setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = from_dict(config["cfg"])
    run_dir = Path(config["run_dir"])
    main = rank == 0
    start_state = load_checkpoint(run_dir / START)
    reported = ray.train.get_checkpoint()  # a restarted group: the last checkpoint it reported
    if reported is not None:
        with reported.as_directory() as folder:
            state = load_checkpoint(Path(folder) / "checkpoint.pt")
    else:
        state = start_state
    if main:  # a restarted group computes the steps after its checkpoint again, and logs them again
        drop_records_after(run_dir / "metrics.jsonl", state["step"])
    starts = _count_start(run_dir, state["step"]) if main else 0
    tracker = None
    if main and config["tracking"] is not None:
        from metadist.tracking import Tracker  # MLflow is loaded in rank 0 only: no other rank logs

        t = config["tracking"]
        run_id_file = run_dir / RUN_ID
        run_id = run_id_file.read_text().strip() if run_id_file.exists() else t["run_id"]
        tracker = Tracker(cfg, uri=t["uri"], run_id=run_id, parent_run_id=t["parent_run_id"],
                          run_name=t["run_name"], tags=t["tags"])
    executor = CollectiveExecutor(cfg, rank, world, restarts=max(starts - 1, 0))
    console = Console(stderr=True, quiet=True)  # the driver shows the progress and the evaluation
    trainer = Trainer(cfg, run_dir=run_dir, console=console, tracker=tracker, device=executor.device)
    trainer.main = main
    trainer.tracked = config["tracking"] is not None  # every rank evaluates the baseline rank 0 records
    trainer.executor = executor
    if main:
        trainer.callbacks.append(Callback(Every(1), _write_progress))
    trainer.callbacks.extend(config["callbacks"])
    if main:  # which process is which rank, for `ray status`, for a debugger, for a test's fault
        (run_dir / RANKS).write_text(json.dumps(executor.infos, indent=2))
    trainer.load_state(state)  # every rank from the same state: identical parameters from the start
    trainer.restarts_before = start_state.get("worker_restarts", 0)  # restarts before this fit()
    if trainer.resume_data and any(s is not None for s in trainer.resume_data):
        executor.load_data_state(trainer.resume_data)
    try:
        trainer.start()  # fit() finds it started
        if tracker is not None:  # a restarted rank 0 continues this MLflow run, not a new one
            (run_dir / RUN_ID).write_text(tracker.run_id)
        summary = trainer.fit(progress=False)
    except UserError as err:
        # A restart would meet the same error: end this rank now, and let the driver raise it. An error
        # every rank meets (a diverged step: the gradient is all-reduced) ends the group at once; one
        # rank's alone (its shards) leaves the others waiting in a collective until the timeout fails
        # the group, and the driver then raises this error rather than the group's.
        error = run_dir / ERROR
        if not error.exists():
            write_text_atomically(error, json.dumps({"type": type(err).__name__, "message": str(err),
                                                     "rank": rank}))
        return
    # What every rank ended with, so that a test (or a reader of the summary) sees they agree bitwise.
    digests: list = [None] * world
    dist.all_gather_object(digests, param_digest(trainer.params))
    if main:
        summary["runtime"]["param_digests"] = digests
        (run_dir / SUMMARY).write_text(json.dumps(summary, indent=2, default=str))


def _write_progress(trainer) -> None:
    # Rank 0's step and meta-loss, for the driver's progress bar: a small file replaced each step (tens
    # of microseconds), since the driver has no other view into the loop between checkpoints.
    write_text_atomically(trainer.run_dir / PROGRESS,
                          json.dumps({"step": trainer.step, "loss": trainer.last_loss}))


@contextmanager
def _follow(trainer, enabled: bool):
    """The driver's progress bar while the group runs: a thread reads rank 0's progress file twice a
    second (fit() blocks this thread; Ctrl-C still reaches Ray Train's handler in it)."""
    path, stop = trainer.run_dir / PROGRESS, threading.Event()
    with trainer._progress(enabled) as bar:
        task = bar.add_task("meta-train", total=trainer.cfg.train.steps, completed=trainer.step, loss=math.nan)

        def follow():
            while not stop.wait(0.5):
                try:
                    now = json.loads(path.read_text())
                except (FileNotFoundError, ValueError):
                    continue
                bar.update(task, completed=now["step"], loss=now["loss"])

        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


def param_digest(params: Tensors) -> str:
    """A SHA-256 of the parameters' bytes, in name order: equal digests mean bitwise-equal parameters."""
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(params[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _count_start(run_dir: Path, step: int) -> int:
    """This group start's number within the run's fit() (1 for the first): rank 0 appends a line with
    the time and the step it starts from."""
    path = run_dir / STARTS
    with open(path, "a") as fh:
        fh.write(f"{time.time():.3f} {step}\n")
    return len(path.read_text().splitlines())


# -- in the driver --------------------------------------------------------------------------------------
def fit(trainer, progress: bool = True, callbacks: tuple = ()) -> dict:
    """Run `trainer`'s run on a Ray Train group and bring its result back into `trainer`: the final
    parameters, optimizer and history from rank 0's checkpoint, and the summary rank 0 wrote. With
    `progress`, a bar follows rank 0's steps.
    `callbacks`: Ray Train callbacks for the group (a sweep trial's report to Tune)."""
    from metadist.runtime.driver import read_history

    cfg, run_dir = trainer.cfg, trainer.run_dir
    rt = cfg.runtime
    for name in (START, SUMMARY, ERROR, STARTS, RANKS, PROGRESS):
        (run_dir / name).unlink(missing_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    save_checkpoint(run_dir / START, trainer.state())
    tracker = trainer.tracker
    tracking = None if tracker is None else {
        "uri": tracker.uri, "run_id": tracker.run_id, "parent_run_id": tracker.parent_run_id,
        "run_name": tracker.run_name, "tags": tracker.extra_tags}
    if tracker is not None and tracker.run_id is not None:
        (run_dir / RUN_ID).write_text(tracker.run_id)
    # The dashboard is on for a Ray started here: Ray Train's placement-group cleaner asks its state API.
    owns_ray = connect_for(cfg, dashboard=True)
    try:
        check_resources(cfg)
        gpu = rt.gpus_per_worker > 0
        resources = {"CPU": rt.cpus_per_worker, **({"GPU": rt.gpus_per_worker} if gpu else {})}
        group = TorchTrainer(
            rank_main,
            train_loop_config={"cfg": to_dict(cfg), "run_dir": str(run_dir.resolve()), "tracking": tracking,
                               "callbacks": list(trainer.rank_callbacks)},
            torch_config=TorchConfig(backend=None, timeout_s=rt.collective_timeout_s),
            scaling_config=ray.train.ScalingConfig(num_workers=rt.workers, use_gpu=gpu,
                                                   resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name=f"{run_dir.name}-{int(time.time() * 1000)}",  # a reused name would resume silently
                storage_path=str((run_dir / "ray_train").resolve()),
                # The controller itself gives up after 2 failed attempts to start the group (the default,
                # -1, retries an impossible one forever); ranks that fail are restarted max_failures times.
                failure_config=ray.train.FailureConfig(max_failures=rt.max_worker_restarts,
                                                       controller_failure_limit=2),
                # A restart needs the latest registered checkpoint; the run folder keeps the run's own.
                # Ray Train's default keeps every one reported, a full copy each.
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2), callbacks=list(callbacks),
                # A rank computes in a thread of its process, not in the main thread as an actor does, and
                # glibc gives such a thread a malloc arena of its own, in which every large tensor is
                # mapped and unmapped again: the same share took 1.14x as long there (bench/reducer.py).
                # One arena, the main one, for the whole rank process.
                worker_runtime_env={"env_vars": {"MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "1")}}))
        trainer.console.log(f"collective: {rt.workers} rank(s), all-reduce over "
                            f"{'nccl' if gpu else 'gloo'}")
        try:
            with _follow(trainer, progress):
                group.fit()
        except (ray.train.TrainingFailedError, ray.train.ControllerError) as err:
            _raise_user_error(run_dir)
            if tracker is not None and (run_dir / RUN_ID).exists():
                tracker.run_id = (run_dir / RUN_ID).read_text().strip()
                tracker.fail(err)
            raise ClusterError(f"the collective group failed after runtime.max_worker_restarts="
                               f"{rt.max_worker_restarts} restarts: {_cause(err)}") from None
    finally:
        if owns_ray:
            ray.shutdown()
    _raise_user_error(run_dir)
    first = trainer.step
    trainer.load_state(load_checkpoint(run_dir / "checkpoint.pt"))
    trainer.use_selected()  # the parameters rank 0 evaluated, as a local run's trainer holds them
    trainer.history = [r for r in read_history(run_dir) if r["step"] >= first]  # this segment's, as elsewhere
    if tracker is not None and (run_dir / RUN_ID).exists():
        # Rank 0 recorded the run and has finished it; the driver only learns where it is.
        tracker.run_id = (run_dir / RUN_ID).read_text().strip()
        tracker.experiment_id = tracker.client.get_run(tracker.run_id).info.experiment_id
    summary = json.loads((run_dir / SUMMARY).read_text())
    print_eval(summary["eval"], title=cfg.name, console=trainer.console)
    return summary


def _cause(err: Exception) -> str:
    """One line saying why Ray Train gave up. Its controller error puts the cause after a first line that
    says only "Training failed due to controller error:", so the whole text is folded onto one line."""
    inner = getattr(err, "controller_failure", None)
    text = f"{type(inner).__name__}: {inner}" if inner is not None else str(err)
    return " ".join(text.split())[:400]


def _raise_user_error(run_dir: Path) -> None:
    """Raise the user error a rank ended with, under its own type, if one did."""
    if (run_dir / ERROR).exists():
        error = json.loads((run_dir / ERROR).read_text())
        raise _ERRORS.get(error["type"], UserError)(error["message"])
