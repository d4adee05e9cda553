"""The driver: the outer loop, the same for every executor.

`Trainer.fit` is the whole outer loop: each step asks the executor (`runtime.executor`: in-process
`local`, Ray worker actors, or, on every rank of a Ray Train group, the all-reduce of `collective`) for
the summed meta-gradients of the meta-batch, divides by the task count and takes the outer step; then every `Callback` whose cadence falls on that step runs (logging,
validation, checkpoints, and whatever a Tune trial or a test adds). The driver computes everything a run
records, evaluations and the data of its figures included; the tracker only records what it is handed.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn

from metadist.algorithms import init_meta_params, make_spec, trpo
from metadist.config import Config, ConfigError, dump_config, from_dict, parse_override, read_yaml, to_dict
from metadist.evaluation import evaluate, lower_is_better, navigation_paths, print_eval, sine_fits
from metadist.models import build_model
from metadist.runtime.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from metadist.runtime.errors import TrainingDiverged
from metadist.runtime.flat import Layout
from metadist.runtime.local import LocalExecutor, resolve_device
from metadist.store_uri import out_dir
from metadist.tasks import build_tasks


def new_run_dir(cfg: Config) -> Path:
    """A fresh folder `<train.out_dir>/<name>-<timestamp>` for this run's files (`store_uri.out_dir`)."""
    base = out_dir(cfg.train.out_dir, "train.out_dir", "runs") / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    path.mkdir(parents=True)
    return path


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config):
    """The meta learning rate's schedule over `train.steps` (`outer.schedule`), None when constant."""
    o, steps = cfg.outer, cfg.train.steps
    if o.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=o.min_lr)
    if o.schedule == "linear":
        # Reptile's step size at iteration i of N: lr + (min_lr - lr) * i / N.
        return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=o.min_lr / o.lr,
                                                 total_iters=steps)
    return None


def make_executor(cfg: Config, params: dict, console: Console):
    if cfg.runtime.executor == "ray":
        from metadist.runtime.ray_executor import RayExecutor  # ray is imported only when asked for
        return RayExecutor(cfg, Layout.of(params), console=console)
    return LocalExecutor(cfg)


@dataclass(frozen=True)
class Every:
    """A cadence over completed outer steps: every `n` of them (0: never), counted from the first step
    when `first` (steps 1, n+1, 2n+1, ...) else from the n-th (n, 2n, ...); `last` adds the final step."""

    n: int
    first: bool = False
    last: bool = False

    def __call__(self, done: int, total: int) -> bool:
        if not self.n:
            return False
        if self.last and done == total:
            return True
        return (done - 1) % self.n == 0 if self.first else done % self.n == 0


@dataclass
class Callback:
    """`fn(trainer)`, run after each outer step that `every` names, in the order of `Trainer.callbacks`."""

    every: Every
    fn: Callable[["Trainer"], object]


class StepClock:
    """The one timer of the outer loop. Per step: wall time and the executor's compute and communication
    shares, averaged over the steps since the last logging record; and the steady-state throughput, with
    the first `warmup` steps (start-up, Ray's first calls) left out."""

    def __init__(self, warmup: int):
        self.warmup, self.seen = warmup, 0
        self.steady_steps, self.steady_tasks, self.steady_s = 0, 0, 0.0
        self._window = [0, 0.0, 0.0, 0.0]  # steps, wall, compute, communication since the last read

    def add(self, tasks: int, wall_s: float, compute_s: float, comm_s: float) -> None:
        self.seen += 1
        w = self._window
        w[0], w[1], w[2], w[3] = w[0] + 1, w[1] + wall_s, w[2] + compute_s, w[3] + comm_s
        if self.seen > self.warmup:
            self.steady_steps += 1
            self.steady_tasks += tasks
            self.steady_s += wall_s

    def read(self) -> dict:
        """Mean seconds per step since the last read (then starts a new window), and tasks/s so far."""
        n, wall, compute, comm = self._window
        n = max(n, 1)
        self._window = [0, 0.0, 0.0, 0.0]
        return {"time_step_s": wall / n, "time_compute_s": compute / n, "time_comm_s": comm / n,
                "time_driver_s": max(wall - compute - comm, 0.0) / n, "tasks_per_s": self.rate()}

    def rate(self) -> float:
        return self.steady_tasks / self.steady_s if self.steady_s > 0 else math.nan


class Trainer:
    """The driver of one run: the meta-parameters, the outer optimizer, the executor and the tracker."""

    def __init__(self, cfg: Config, run_dir: Path | None = None, console: Console | None = None,
                 tracker=None, device: torch.device | None = None):
        self.cfg = cfg
        self.console = console or Console(stderr=True)
        if cfg.runtime.threads:
            torch.set_num_threads(cfg.runtime.threads)
        # With Ray the accelerators belong to the workers; the driver reduces and steps on the CPU. A
        # collective rank passes its own device: it steps there.
        self.device = device or (resolve_device(cfg.runtime.device) if cfg.runtime.executor == "local"
                                 else torch.device("cpu"))
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg).to(self.device)
        self.params = {n: p.to(self.device) for n, p in init_meta_params(self.model, cfg).items()}
        for p in self.model.parameters():
            p.requires_grad_(False)  # the model only carries structure and buffers; params are explicit
        # TRPO's step is computed from the executor's sums each step (`trpo_step`): no optimizer state.
        opt_cls = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}.get(cfg.outer.optimizer)
        self.optimizer = opt_cls(list(self.params.values()), lr=cfg.outer.lr) if opt_cls else None
        self.scheduler = make_scheduler(self.optimizer, cfg) if self.optimizer else None
        self.tasks = build_tasks(cfg)  # evaluation tasks; training tasks are drawn by the executor
        # `vmap` or `loop` for training and evaluation alike; `auto` is resolved once, at start.
        self.task_parallel = None if cfg.algorithm.task_parallel == "auto" else cfg.algorithm.task_parallel
        # Checkpointed inner steps: the config's, or (`auto`) whether the first batch's measured peak fits.
        self.inner_checkpoint = None if cfg.inner.checkpoint == "auto" else cfg.inner.checkpoint
        self.step = 0
        self.last_loss = math.nan
        self.history: list[dict] = []
        self.last_record: dict | None = None  # the metrics of the last outer step that tracked them
        self.last_validation: dict | None = None
        # `train.select: best_val`: the step, val metric, parameters and buffers of the best validation so far.
        self.best: dict | None = None
        self.selected_step: int | None = None  # the outer steps done when the evaluated parameters were kept
        self.restarts_before = 0  # worker restarts of earlier (resumed-from) segments of this run
        if run_dir is None and cfg.runtime.executor != "local" and cfg.runtime.address:
            from metadist.runtime.cluster import check_reachable  # a cluster that is not there: one error
            check_reachable(cfg.runtime.address)  # now, before a run folder exists (as for the store)
        if run_dir is None and cfg.tracking.compare:
            compared_reports(cfg)  # a folder that cannot be compared is one line now, not after training
        self.run_dir = run_dir or new_run_dir(cfg)
        # The process that writes the run folder and the logs: the driver, or rank 0 of a collective group.
        self.main = True
        self.executor = None
        self.resume_data = None  # task stream positions from a checkpoint, applied when the workers start
        self.tracker = tracker
        # Whether the run is recorded: on a collective group only rank 0 holds the tracker, but every rank
        # takes part in the baseline evaluation that the record's plots need.
        self.tracked = tracker is not None
        self.started = False
        self.baseline: dict | None = None  # evaluation and parameters before meta-training, for the plots
        self.saved_state: dict | None = None  # the state the last checkpoint holds
        self.clock = StepClock(cfg.train.warmup_steps)
        t = cfg.train
        self.log_cadence = Every(t.log_every, first=True, last=True)
        self.validation_cadence = Every(t.eval_every, last=True)
        self.callbacks: list[Callback] = [Callback(self.log_cadence, Trainer.log_training),
                                          Callback(self.validation_cadence, Trainer.validate),
                                          Callback(Every(t.checkpoint_every), Trainer.save)]
        # With the collective executor the ranks run the loop, not this process: callbacks for them (a
        # Tune report, a test's fault) go here, travel to every rank, and run after `callbacks` there.
        self.rank_callbacks: list[Callback] = []

    # -- the outer loop ---------------------------------------------------------------------------
    def fit(self, progress: bool = True) -> dict:
        """Meta-train until `train.steps`, then evaluate; returns the run summary. The tracker's run ends
        FINISHED, or FAILED / KILLED with the error, whatever step raised."""
        if self.cfg.runtime.executor == "collective" and self.executor is None:
            from metadist.runtime import collective  # every rank runs this same loop, on a Ray Train group
            return collective.fit(self, progress)
        total = self.cfg.train.steps
        if self.main:
            (self.run_dir / "config.yaml").write_text(dump_config(self.cfg))
        try:
            self.start()
            with self._progress(progress) as bar:
                task = bar.add_task("meta-train", total=total, completed=self.step, loss=math.nan)
                while self.step < total:
                    self.train_step()
                    for callback in self.callbacks:
                        if callback.every(self.step, total):
                            callback.fn(self)
                    bar.update(task, completed=self.step, loss=self.last_loss)
            return self.finish()
        except BaseException as err:
            if self.tracker is not None:
                self.tracker.fail(err, diverged=isinstance(err, TrainingDiverged))
            raise
        finally:
            self.close()

    def train_step(self) -> None:
        """One outer step; on the steps the logging cadence names, `last_record` holds its metrics."""
        cfg, step = self.cfg, self.step
        track = self.log_cadence(step + 1, cfg.train.steps)
        # Pre-adaptation metrics cost a query forward per task: only on the steps that log them.
        spec = make_spec(cfg, step, track=track, task_parallel=self.task_parallel,
                         checkpoint=self.inner_checkpoint).with_(report_before=track)
        start = time.perf_counter()
        result = self.executor.compute(self.params, step, spec, cfg.train.meta_batch)
        sums = result.sums
        n = sums.pop("tasks")
        self.last_loss = (sums["loss_after"] / n).item()
        worker_s = 0.0  # TRPO's products and line search: work in the executor after `compute`
        if self.optimizer is None:
            lr_outer, extra = math.nan, self.trpo_step(result.grads, n, step, spec)
            worker_s = extra.pop("time_s")
        else:
            lr_outer = self.optimizer.param_groups[0]["lr"]  # the rate this step uses, before the schedule moves
            self.outer_step(result.grads, sums, n)
            extra = {}
        self.step += 1
        # TRPO's executor calls count as compute (with Ray they include their round trips), so that the
        # driver's share is what the driver itself does.
        self.clock.add(cfg.train.meta_batch, time.perf_counter() - start, result.compute_s + worker_s, result.comm_s)
        self.last_record = None
        if track:
            record = {"step": step, **({"lr_outer": lr_outer} if self.optimizer else {}), **extra}
            for k, v in sums.items():
                if not k.startswith("bn_"):
                    v = v / n if k != "diverged" else v
                    record[k] = v.tolist() if v.dim() else v.item()
            self.last_record = record

    def outer_step(self, grads: dict, sums: dict, n: torch.Tensor) -> None:
        """Mean meta-gradient -> outer optimizer step; fold BatchNorm statistics in per_step mode."""
        for name, p in self.params.items():
            p.grad = grads[name].to(self.device) / n
        self._check_finite([p.grad for p in self.params.values()])
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if "bn_mean" in sums:
            self.model.update_running_stats(sums["bn_mean"].to(self.device) / n,
                                            sums["bn_var"].to(self.device) / n, self.cfg.model.bn_momentum)

    def trpo_step(self, grads: dict, n: torch.Tensor, step: int, spec) -> dict:
        """The TRPO outer step (`outer.optimizer: trpo`): the natural-gradient direction and line search
        of `algorithms.trpo`, on the mean KL's Hessian-vector products and the candidates' surrogate,
        which the executor sums over the meta-batch's trajectories of this step (they never leave the
        workers). Returns the step's TRPO metrics and `time_s`, the seconds spent in the executor."""
        rl, tasks = self.cfg.rl, self.cfg.train.meta_batch
        start = {k: v.detach().clone() for k, v in self.params.items()}
        grad = {k: grads[k].to(self.device) / n for k in start}
        self._check_finite(list(grad.values()))

        spent = [0.0]

        def fvp(v: dict) -> dict:
            t = time.perf_counter()
            hv = self.executor.fvp(start, step, spec, tasks, v)
            spent[0] += time.perf_counter() - t
            return {k: x.to(self.device) / n for k, x in hv.items()}

        def evaluate(candidate: dict) -> tuple[float, float]:
            t = time.perf_counter()
            loss, kl = (self.executor.surrogate(start, step, spec, tasks, candidate) / n).tolist()
            spent[0] += time.perf_counter() - t
            return loss, kl

        new, info = trpo.outer_step(start, grad, fvp, evaluate, rl.max_kl, rl.cg_iters, rl.cg_damping,
                                    rl.line_search_steps, rl.backtrack)
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(new[k])
        return {"trpo_kl": info["kl"], "trpo_backtracks": info["backtracks"],
                "trpo_improvement": info["surrogate_before"] - info["surrogate_after"], "time_s": spent[0]}

    def _check_finite(self, grads: list) -> None:
        if not math.isfinite(self.last_loss) or not all(torch.isfinite(g).all() for g in grads):
            raise TrainingDiverged(
                f"the meta-loss or meta-gradient is not finite at step {self.step}; the inner loop diverged "
                f"(inner.lr={self.cfg.inner.lr}, outer.lr={self.cfg.outer.lr}): lower one of them")

    # -- the callbacks' steps ---------------------------------------------------------------------
    def log_training(self) -> None:
        """Log the last tracked step's metrics with the time per step since the previous record."""
        self.log({**self.last_record, **self.clock.read(), "worker_restarts": self.worker_restarts})

    def validate(self) -> dict:
        """Log and return a record of the metric after 0..eval.steps test-time steps on the fixed
        val-split tasks (`eval.val_episodes`)."""
        report = self.report(episodes=self.cfg.eval.val_episodes, split="val")
        name = report["metric"]
        record = {"step": self.step - 1, f"val_{name}": report["rows"][-1]["mean"]}
        record.update({f"val_{name}_{r['steps']}": r["mean"] for r in report["rows"]})
        self.log(record)
        self.last_validation = record
        if self.cfg.train.select == "best_val":
            self._keep_if_best(record[f"val_{name}"], lower_is_better(name))
        return record

    def _keep_if_best(self, value: float, lower: bool) -> None:
        if self.best is not None:
            old = self.best["value"]
            # A later validation wins a tie; a NaN never wins, and loses to any number.
            if math.isnan(value) or not (math.isnan(old) or (value <= old if lower else value >= old)):
                return
        self.best = {"step": self.step, "value": value,
                     "params": {k: v.detach().cpu().clone() for k, v in self.params.items()},
                     "buffers": {k: v.detach().cpu().clone() for k, v in self.model.named_buffers()}}

    def use_selected(self) -> int:
        """Put the parameters `train.select` names in place (`best_val`: those of the best validation) and
        return the step they are from (the count of outer steps done when they were kept)."""
        if self.cfg.train.select != "best_val" or self.best is None:
            return self.step
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.best["params"][k].to(p.device))
        self.model.load_state_dict({**self.model.state_dict(), **self.best["buffers"]}, strict=False)
        return self.best["step"]

    def save(self) -> Path:
        """Write the checkpoint (atomically) and hand it to the tracker, and to a collective group."""
        path = self.run_dir / "checkpoint.pt"
        self.saved_state = self.state()  # on every rank of a collective group: it gathers their streams
        if self.main:
            save_checkpoint(path, self.saved_state)
            if self.tracker is not None:
                self.tracker.checkpoint_saved(path)
        if hasattr(self.executor, "checkpoint_saved"):
            self.executor.checkpoint_saved(path if self.main else None, self.step)
        return path

    # -- around the loop ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the executor (Ray workers), resolve `auto`, open the tracker's run, and evaluate the
        initial parameters for the record; once (a second call does nothing)."""
        if self.started:
            return
        if self.executor is None:
            self.executor = make_executor(self.cfg, self.params, self.console)
            if self.resume_data and any(s is not None for s in self.resume_data):
                self.executor.load_data_state(self.resume_data)
        self.resolve_task_parallel()
        if self.tracker is not None:
            info = self.executor.describe()
            system = {"ray_version": info.get("ray_version", "-"), "workers": str(info["workers"]),
                      "device_kinds": ",".join(info["devices"]), "torch_version": torch.__version__,
                      "task_parallel": self.task_parallel, "inner_checkpoint": str(self.inner_checkpoint)}
            self.tracker.start(self.run_dir, system, self.datasets())
        if self.tracked:
            self.baseline = self._baseline()
        self.started = True

    def resolve_task_parallel(self) -> str:
        """The run's `vmap` or `loop`: the config's, else (`auto`) whichever the executor measured faster
        on the first batch; without a started executor an in-process one measures it. `inner.checkpoint:
        auto` is resolved first, the same way (checkpointing then means `loop`)."""
        if self.inner_checkpoint is not None and self.task_parallel is not None:
            return self.task_parallel
        executor = self.executor or LocalExecutor(self.cfg)
        if self.inner_checkpoint is None:
            spec = make_spec(self.cfg, self.step, task_parallel="loop", checkpoint=False)
            self.inner_checkpoint = executor.choose_checkpoint(self.params, self.step, spec, self.cfg.train.meta_batch)
        if self.task_parallel is None and self.inner_checkpoint:
            self.task_parallel = "loop"  # checkpointed inner steps need plain autograd: nothing to time
        if self.task_parallel is None:
            spec = make_spec(self.cfg, self.step, task_parallel="vmap", checkpoint=self.inner_checkpoint)
            self.task_parallel = executor.choose_task_parallel(self.params, self.step, spec,
                                                               self.cfg.train.meta_batch)
        if executor is not self.executor:
            executor.close()
        return self.task_parallel

    def datasets(self) -> list[dict]:
        """The task sources this run reads, one per split used: training, validation, evaluation."""
        splits = ["train"] + (["val"] if self.cfg.train.eval_every else []) + [self.cfg.eval.split]
        return [self.tasks.dataset(split) for split in dict.fromkeys(splits)]

    def _baseline(self) -> dict | None:
        # The "before meta-training" side of the plots: the initial parameters and their evaluation, kept
        # in the run folder so that a resumed run draws the same curves.
        # At step 0 it is always computed: on a collective group every rank takes part, and none may skip
        # it because rank 0 already wrote it before a restart.
        path, init_path = self.run_dir / "eval_initial.json", self.run_dir / "params_initial.pt"
        if self.step != 0:
            if path.exists() and init_path.exists():
                return {"report": json.loads(path.read_text()), "params": torch.load(init_path, weights_only=True)}
            return None  # resumed without a baseline: the plots show the meta-trained run alone
        params = {k: v.detach().clone() for k, v in self.params.items()}
        report = self.report()
        if self.main:
            torch.save(params, init_path)
            path.write_text(json.dumps(report, indent=2))
        return {"report": report, "params": params}

    def finish(self) -> dict:
        """The final checkpoint and evaluation; the summary; and, with a tracker, the run's record:
        metrics, files and figures, all computed here."""
        saved = self.saved_state is not None and self.saved_state["step"] == self.step
        checkpoint = self.run_dir / "checkpoint.pt" if saved else self.save()  # once, if the cadence just did
        # The checkpoint keeps the last state (a resume continues from it); all after it uses the selection.
        self.selected_step = self.use_selected()
        if self.cfg.train.select != "last":
            self.log({"step": self.step - 1, "selected_step": self.selected_step})
            if self.main:
                self.console.print(f"evaluating the parameters of the best validation: after {self.selected_step} "
                                   f"of {self.step} outer steps (train.select={self.cfg.train.select})")
        report = self.evaluate()  # on a collective group every rank adapts its share of the episodes
        if not self.main:
            return {}  # the other ranks of a collective group are done: rank 0 records
        summary = self.summary(report, checkpoint)
        if self.tracker is not None:
            model_path = self.run_dir / "model.pt"
            # The model file: the config with the selected parameters and buffers.
            torch.save({"config": self.saved_state["config"],
                        "params": {k: v.detach().cpu() for k, v in self.params.items()},
                        "buffers": {k: v.cpu() for k, v in self.model.named_buffers()}}, model_path)
            files = {name: self.run_dir / name for name in ("eval.json", "metrics.jsonl")}
            self.tracker.finish(self.step, summary["eval"], files=files, model=model_path,
                                figures=self.figures(summary["eval"]),
                                tasks_per_s=summary["throughput"]["tasks_per_s"])
        return summary

    def figures(self, report: dict) -> dict:
        """The run's plots as matplotlib figures, keyed by artifact path."""
        from metadist import plots  # matplotlib is loaded by the process that records, when it records
        name, base = self.cfg.name, self.baseline
        out = {}
        history = read_history(self.run_dir)
        if history:
            out["plots/training_curve.png"] = plots.training_curve(history, name)
        reports = {"before meta-training": base["report"]} if base else {}
        reports["after meta-training"] = report
        reports.update(compared_reports(self.cfg))
        out["plots/adaptation_curve.png"] = plots.adaptation_curve(reports, name)
        if self.cfg.task.family == "sinusoid":
            sets = {"before meta-training": base["params"]} if base else {}
            sets["after meta-training"] = self.params
            fits = {label: sine_fits(self.model, params, self.cfg, self.tasks, task_parallel=self.task_parallel,
                                     n_tasks=self.cfg.tracking.plot_tasks) for label, params in sets.items()}
            out["plots/sine_fits.png"] = plots.sine_fits(fits)
        if self.cfg.task.family == "navigation":
            sets = {"before meta-training": base["params"]} if base else {}
            sets["after meta-training"] = self.params
            paths = {label: navigation_paths(self.model, params, self.cfg, self.tasks, self.cfg.tracking.plot_tasks)
                     for label, params in sets.items()}
            out["plots/navigation_paths.png"] = plots.navigation_paths(paths)
        return out

    def close(self) -> None:
        """Stop the executor's workers (a Ray instance this run started goes with them)."""
        if self.executor is not None:
            self.executor.close()
            self.executor = None
        self.started = False

    def _data_state(self):
        # Procedural tasks: the step is the whole cursor. Streams: each worker's position.
        if self.executor is not None:
            return self.executor.data_state()
        return self.resume_data

    @property
    def worker_restarts(self) -> int:
        return self.restarts_before + (self.executor.restarts if self.executor is not None else 0)

    def log(self, record: dict) -> None:
        self.history.append(record)
        if not self.main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            self.tracker.log_record(record)

    def state(self) -> dict:
        return {
            "config": to_dict(self.cfg),
            "step": self.step,
            "params": {k: v.detach().cpu() for k, v in self.params.items()},
            "buffers": {k: v.cpu() for k, v in self.model.named_buffers()},
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "torch_rng": torch.get_rng_state(),
            # Procedural tasks are a pure function of (seed, step, index): the step is their cursor.
            "data_cursor": {"workers": self._data_state()},
            "task_parallel": self.task_parallel,
            "inner_checkpoint": self.inner_checkpoint,
            "worker_restarts": self.worker_restarts,
            "mlflow_run_id": getattr(self.tracker, "run_id", None),
            "best": self.best,
        }

    def load_state(self, state: dict) -> None:
        """Continue from a checkpoint's state (same config). Nothing in the run folder is changed."""
        for k, v in state["params"].items():
            self.params[k].copy_(v)
        self.model.load_state_dict({**self.model.state_dict(), **state["buffers"]}, strict=False)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.step = state["step"]
        self.task_parallel = self.task_parallel or state.get("task_parallel")
        if self.inner_checkpoint is None:
            self.inner_checkpoint = state.get("inner_checkpoint")
        self.restarts_before = state.get("worker_restarts", 0)
        self.best = state.get("best")
        self.resume_data = state.get("data_cursor", {}).get("workers")

    def report(self, episodes: int | None = None, steps: int | None = None, split: str | None = None) -> dict:
        """The evaluation report of the current parameters on the fixed tasks of `split` (eval.split).
        With Ray workers or ranks, each adapts its share of the episodes on its own device and the
        per-episode results are gathered, so the report equals this process's own."""
        task_parallel = self.resolve_task_parallel()
        curves = None
        if hasattr(self.executor, "eval_curves"):
            buffers = dict(self.model.named_buffers())  # the running statistics live in the driver's model
            curves = partial(self.executor.eval_curves, self.params, buffers, task_parallel=task_parallel)
        return evaluate(self.model, self.params, self.cfg, self.tasks, task_parallel=task_parallel,
                        episodes=episodes, steps=steps, split=split, curves=curves)

    def evaluate(self, episodes: int | None = None, steps: int | None = None) -> dict:
        """The final evaluation: the report, written to eval.json and printed."""
        report = self.report(episodes=episodes, steps=steps)
        if self.main:
            (self.run_dir / "eval.json").write_text(json.dumps(report, indent=2))
            print_eval(report, title=self.cfg.name, console=self.console)
        return report

    def summary(self, report: dict, checkpoint: Path) -> dict:
        final: dict = {}
        for record in self.history:  # the latest value of every key: training and validation records
            final.update(record)
        info = self.executor.describe() if self.executor is not None else {}
        return {
            "config": to_dict(self.cfg),
            "metrics": {k: v for k, v in final.items() if not isinstance(v, list)},
            "throughput": {"tasks_per_s": self.clock.rate(), "steps_timed": self.clock.steady_steps,
                           "task_parallel": self.task_parallel, "inner_checkpoint": self.inner_checkpoint},
            "eval": report,
            "selected_step": self.selected_step,
            "checkpoint": str(checkpoint),
            "run_dir": str(self.run_dir),
            "runtime": info | {"worker_restarts": self.worker_restarts},
        }

    def _progress(self, enabled: bool) -> Progress:
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("meta-loss {task.fields[loss]:.4f}"), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=self.console, disable=not enabled,
                        refresh_per_second=4)


def read_history(run_dir: Path) -> list[dict]:
    """The records of `metrics.jsonl`: every segment of a resumed run, not only this process's."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_finished_run(path: str | Path) -> tuple[Config, dict]:
    """The config and test evaluation of a finished run: its folder (config.yaml and eval.json), or the
    summary JSON that `metadist train` or `metadist eval` wrote with --summary-json. ValueError (one
    line) when `path` is neither."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        summary = json.loads(path.read_text())
        if not isinstance(summary, dict) or not {"config", "eval"} <= summary.keys():
            raise ValueError(f"{path} is not a run summary of metadist train or eval (--summary-json)")
        return from_dict(summary["config"]), summary["eval"]
    missing = [f for f in ("config.yaml", "eval.json") if not (path / f).is_file()]
    if missing:
        raise ValueError(f"{path} holds no finished run: it has no {' or '.join(missing)}")
    return from_dict(read_yaml(path / "config.yaml", "run config")), json.loads((path / "eval.json").read_text())


def compared_reports(cfg: Config) -> dict[str, dict]:
    """The test evaluations of the runs in `tracking.compare`, labelled by run name and seed; one
    ConfigError if a folder holds no finished run or scored other tasks than `cfg` does."""
    out = {}
    for folder in cfg.tracking.compare:
        try:
            other, report = read_finished_run(folder)
        except ValueError as err:
            raise ConfigError(f"tracking.compare: {err}; allowed: folders of finished runs") from None
        mine = (cfg.eval.split, cfg.eval.shots or cfg.task.shots, cfg.eval.episodes)
        theirs = (report["split"], report["shots"], report["episodes"])
        if theirs != mine:
            raise ConfigError(f"tracking.compare: {folder} was scored on {theirs[2]} {theirs[0]} tasks, "
                              f"{theirs[1]}-shot; this run on {mine[2]} {mine[0]} tasks, {mine[1]}-shot; allowed: "
                              "runs scored on the same tasks")
        out[f"{other.name} (seed {other.seed})"] = report
    return out


def resume_trainer(target: str | Path, console: Console | None = None, executor: str | None = None) -> Trainer:
    """A trainer continuing the run at `target`: a checkpoint, its run folder, or an MLflow run id; on
    `executor` instead of the one that wrote it, if given (every executor writes the same checkpoint)."""
    path = Path(target)
    if not path.exists():
        from metadist.tracking import find_run_dir
        try:
            path = find_run_dir(str(target))
        except FileNotFoundError as err:
            raise CheckpointError(f"--resume {str(target)!r} is neither a checkpoint, a run folder nor a "
                                  f"known MLflow run id: {err}") from None
    state = load_checkpoint(path)
    config = state["config"]
    if executor is not None:
        config = {**config, "runtime": {**config["runtime"], "executor": executor}}
    cfg = from_dict(config)
    run_dir = path if path.is_dir() else path.parent
    tracker = None
    if cfg.tracking.enabled:
        from metadist.tracking import Tracker
        tracker = Tracker(cfg, run_id=state.get("mlflow_run_id"))
    trainer = Trainer(cfg, run_dir=run_dir, console=console, tracker=tracker)
    trainer.load_state(state)
    drop_records_after(run_dir / "metrics.jsonl", trainer.step)
    return trainer


def drop_records_after(log: Path, step: int) -> None:
    """Remove the records of steps from `step` on: a run resumed from its checkpoint at `step` (after a
    crash, or a collective group's restart) computes and logs them again."""
    if log.exists():
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line)["step"] < step]
        if len(kept) < len(lines):
            log.write_text("".join(line + "\n" for line in kept))


def evaluate_checkpoint(path, episodes=None, steps=None, console: Console | None = None,
                        overrides: list[str] = ()) -> dict:
    """Load a checkpoint and evaluate it on its config's fixed tasks, with `overrides` of `eval.*` keys
    (a test-time learning rate tuned for a baseline, the val split); the run it came from is left as it is."""
    state = load_checkpoint(path)
    for text in overrides:
        key = parse_override(text)[0]
        if not key.startswith("eval."):
            raise ConfigError(f"{key}: only eval.* keys can change for an evaluation of a trained checkpoint "
                              f"(the rest is what the run trained with)")
    cfg = from_dict(state["config"], overrides)
    # The network is built as it was trained (Conv-4 sizes its per-step BatchNorm statistics by eval.steps,
    # and a later test step reuses the last row), then evaluated under the overridden settings.
    trainer = Trainer(from_dict(state["config"]), run_dir=Path(path).parent if Path(path).is_file() else Path(path),
                      console=console)
    trainer.load_state(state)
    trainer.cfg = cfg
    step = trainer.use_selected()
    report = trainer.report(episodes=episodes, steps=steps)
    print_eval(report, title=f"{cfg.name} (step {step})", console=trainer.console)
    return {"config": to_dict(cfg), "metrics": {"step": trainer.step}, "selected_step": step, "eval": report,
            "checkpoint": str(path)}
