"""The driver: the outer loop, the same for every executor.

`Trainer.fit` is the whole outer loop. Each step asks the executor (`runtime.executor`: in-process
`local`, or Ray worker actors) for the summed meta-gradients of the meta-batch, divides by the task
count and takes the outer step. Logging, checkpoints, MLflow and evaluation are named steps around it.
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn

from metadist.algorithms import init_meta_params, make_spec
from metadist.config import Config, dump_config, from_dict, to_dict
from metadist.evaluation import evaluate, print_eval
from metadist.models import build_model
from metadist.models.conv4 import update_running_stats
from metadist.runtime.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from metadist.runtime.errors import TrainingDiverged
from metadist.runtime.flat import Layout
from metadist.runtime.local import LocalExecutor, resolve_device
from metadist.tasks import build_tasks


def new_run_dir(cfg: Config) -> Path:
    """A fresh folder `<train.out_dir>/<name>-<timestamp>` for this run's files."""
    base = Path(cfg.train.out_dir) / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    path.mkdir(parents=True)
    return path


def make_executor(cfg: Config, params: dict, console: Console):
    if cfg.runtime.executor == "ray":
        from metadist.runtime.ray_executor import RayExecutor  # ray is imported only when asked for
        return RayExecutor(cfg, Layout.of(params), console=console)
    return LocalExecutor(cfg)


class Trainer:
    """The driver of one run: the meta-parameters, the outer optimizer, the executor and the tracker."""

    def __init__(self, cfg: Config, run_dir: Path | None = None, console: Console | None = None,
                 tracker=None):
        self.cfg = cfg
        self.console = console or Console(stderr=True)
        if cfg.runtime.threads:
            torch.set_num_threads(cfg.runtime.threads)
        # With Ray the accelerators belong to the workers; the driver reduces and steps on the CPU.
        self.device = resolve_device(cfg.runtime.device) if cfg.runtime.executor == "local" else torch.device("cpu")
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg).to(self.device)
        self.params = {n: p.to(self.device) for n, p in init_meta_params(self.model, cfg).items()}
        for p in self.model.parameters():
            p.requires_grad_(False)  # the model only carries structure and buffers; params are explicit
        opt_cls = torch.optim.Adam if cfg.outer.optimizer == "adam" else torch.optim.SGD
        self.optimizer = opt_cls(list(self.params.values()), lr=cfg.outer.lr)
        self.scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=cfg.train.steps, eta_min=cfg.outer.min_lr) if cfg.outer.cosine else None)
        self.tasks = build_tasks(cfg)  # evaluation tasks; training tasks are drawn by the executor
        self.step = 0
        self.last_loss = math.nan
        self.history: list[dict] = []
        self.restarts_before = 0  # worker restarts of earlier (resumed-from) segments of this run
        self.run_dir = run_dir or new_run_dir(cfg)
        self.executor = None
        self.resume_data = None  # task stream positions from a checkpoint, applied when the workers start
        self.tracker = tracker
        self.on_step = None  # test hook: called with the step number after each outer step
        self.on_validate = None  # called with each validation record (a Tune trial reports it)

    # -- the outer loop ---------------------------------------------------------------------------
    def fit(self, progress: bool = True) -> dict:
        """Meta-train until `train.steps`, then evaluate; returns the run summary."""
        cfg = self.cfg
        (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        timer, split = Throughput(cfg.train.warmup_steps), StepTimes()
        try:
            self.start()
            with self._progress(progress) as bar:
                task = bar.add_task("meta-train", total=cfg.train.steps, completed=self.step, loss=math.nan)
                while self.step < cfg.train.steps:
                    t0 = time.perf_counter()
                    record = self.train_step(split)
                    seconds = time.perf_counter() - t0
                    split.add_total(seconds)
                    timer.add(cfg.train.meta_batch, seconds)
                    if record is not None:
                        self.log({**record, **split.means(), "tasks_per_s": timer.rate(),
                                  "worker_restarts": self.worker_restarts})
                        split = StepTimes()
                    if self._validation_due():
                        record = self.validate()
                        self.log(record)
                        if self.on_validate is not None:
                            self.on_validate(record)
                    if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0:
                        self.save()
                    bar.update(task, completed=self.step, loss=self.last_loss)
                    if self.on_step is not None:
                        self.on_step(self.step)
            checkpoint = self.save()
            summary = self.summary(self.evaluate(), timer, checkpoint)
        except BaseException as err:
            if self.tracker is not None:
                self.tracker.fail(err, diverged=isinstance(err, TrainingDiverged))
            raise
        finally:
            self.close()
        if self.tracker is not None:
            self.tracker.finish(self, summary)
        return summary

    def _validation_due(self) -> bool:
        # The last step is always validated, so a run's final validation metric is its last step's.
        every = self.cfg.train.eval_every
        return bool(every) and (self.step % every == 0 or self.step == self.cfg.train.steps)

    def train_step(self, times: "StepTimes") -> dict | None:
        """One outer step. Returns the averaged metrics on logging steps, else None."""
        cfg, step = self.cfg, self.step
        track = step % cfg.train.log_every == 0 or step == cfg.train.steps - 1
        # Pre-adaptation metrics cost a query forward per task: only on the steps that log them.
        spec = make_spec(cfg, step, track=track).with_(report_before=track)
        result = self.executor.compute(self.params, step, spec, cfg.train.meta_batch)
        times.add(result.compute_s, result.comm_s)
        sums = result.sums
        n = sums.pop("tasks")
        self.last_loss = (sums["loss_after"] / n).item()
        lr_outer = self.optimizer.param_groups[0]["lr"]  # the rate this step uses, before the schedule moves
        self.outer_step(result.grads, sums, n)
        self.step += 1
        if not track:
            return None
        record = {"step": step, "lr_outer": lr_outer}
        for k, v in sums.items():
            if k.startswith("bn_"):
                continue
            v = v / n if k != "diverged" else v
            record[k] = v.tolist() if v.dim() else v.item()
        return record

    def outer_step(self, grads: dict, sums: dict, n: torch.Tensor) -> None:
        """Mean meta-gradient -> outer optimizer step; fold BatchNorm statistics in per_step mode."""
        for name, p in self.params.items():
            p.grad = grads[name].to(self.device) / n
        if not math.isfinite(self.last_loss) or not all(torch.isfinite(p.grad).all() for p in self.params.values()):
            raise TrainingDiverged(
                f"the meta-loss or meta-gradient is not finite at step {self.step}; the inner loop diverged "
                f"(inner.lr={self.cfg.inner.lr}, outer.lr={self.cfg.outer.lr}): lower one of them")
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if "bn_mean" in sums:
            update_running_stats(self.model, sums["bn_mean"].to(self.device) / n,
                                 sums["bn_var"].to(self.device) / n, self.cfg.model.bn_momentum)

    # -- around the loop ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the executor (Ray workers) and the tracker's run, unless already started."""
        if self.executor is None:
            self.executor = make_executor(self.cfg, self.params, self.console)
            if self.resume_data and any(s is not None for s in self.resume_data):
                self.executor.load_data_state(self.resume_data)
        if self.tracker is not None:
            self.tracker.start(self)

    def close(self) -> None:
        """Stop the executor's workers (a Ray instance this run started goes with them)."""
        if self.executor is not None:
            self.executor.close()
            self.executor = None

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
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "torch_rng": torch.get_rng_state(),
            # Procedural tasks are a pure function of (seed, step, index): the step is their cursor.
            "data_cursor": {"next_step": self.step, "workers": self._data_state()},
            "worker_restarts": self.worker_restarts,
            "mlflow_run_id": getattr(self.tracker, "run_id", None),
        }

    def save(self) -> Path:
        path = save_checkpoint(self.run_dir / "checkpoint.pt", self.state())
        if self.tracker is not None:
            self.tracker.checkpoint_saved(path, self.step)
        return path

    def load_state(self, state: dict) -> None:
        """Continue from a checkpoint's state (same config)."""
        for k, v in state["params"].items():
            self.params[k].copy_(v)
        self.model.load_state_dict({**self.model.state_dict(), **state["buffers"]}, strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.step = state["step"]
        self.restarts_before = state.get("worker_restarts", 0)
        self.resume_data = state.get("data_cursor", {}).get("workers")
        # Records a crashed run logged after this checkpoint are recomputed: drop them.
        log = self.run_dir / "metrics.jsonl"
        if log.exists():
            lines = [line for line in log.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if json.loads(line)["step"] < self.step]
            if len(kept) < len(lines):  # evaluating a finished run's checkpoint leaves its log alone
                log.write_text("".join(line + "\n" for line in kept))

    def validate(self) -> dict:
        """A record of the metric after 0..eval.steps test-time steps on the fixed val-split tasks."""
        report = evaluate(self.model, self.params, self.cfg, self.tasks,
                          episodes=self.cfg.eval.val_episodes, split="val")
        name = report["metric"]
        record = {"step": self.step - 1, f"val_{name}": report["rows"][-1]["mean"]}
        record.update({f"val_{name}_{r['steps']}": r["mean"] for r in report["rows"]})
        return record

    def evaluate(self, episodes: int | None = None, steps: int | None = None) -> dict:
        report = evaluate(self.model, self.params, self.cfg, self.tasks, episodes=episodes, steps=steps)
        (self.run_dir / "eval.json").write_text(json.dumps(report, indent=2))
        print_eval(report, title=self.cfg.name, console=self.console)
        return report

    def summary(self, report: dict, timer: "Throughput", checkpoint: Path) -> dict:
        final: dict = {}
        for record in self.history:  # the latest value of every key: training and validation records
            final.update(record)
        info = self.executor.describe() if self.executor is not None else {}
        modes = sorted({w["task_parallel"] for w in info.get("workers_info", [])})
        return {
            "config": to_dict(self.cfg),
            "metrics": {k: v for k, v in final.items() if not isinstance(v, list)},
            "throughput": {"tasks_per_s": timer.rate(), "steps_timed": timer.steps,
                           "task_parallel": "/".join(modes) or self.cfg.algorithm.task_parallel},
            "eval": report,
            "checkpoint": str(checkpoint),
            "run_dir": str(self.run_dir),
            "runtime": {k: v for k, v in info.items() if k != "workers_info"} | {
                "worker_restarts": self.worker_restarts},
        }

    def _progress(self, enabled: bool) -> Progress:
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("meta-loss {task.fields[loss]:.4f}"), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=self.console, disable=not enabled,
                        refresh_per_second=4)


class StepTimes:
    """Where the time of the steps since the last log went: inner loops, transfers, the driver."""

    def __init__(self):
        self.n, self.compute, self.comm, self.total = 0, 0.0, 0.0, 0.0

    def add(self, compute_s: float, comm_s: float) -> None:
        self.n += 1
        self.compute += compute_s
        self.comm += comm_s

    def add_total(self, seconds: float) -> None:
        self.total += seconds

    def means(self) -> dict:
        n = max(self.n, 1)
        return {"time_step_s": self.total / n, "time_compute_s": self.compute / n,
                "time_comm_s": self.comm / n,
                "time_driver_s": max(self.total - self.compute - self.comm, 0.0) / n}


class Throughput:
    """Steady-state tasks/s: the first `warmup` steps (start-up, auto-selection) are left out."""

    def __init__(self, warmup: int):
        self.warmup, self.seen, self.steps, self.tasks, self.seconds = warmup, 0, 0, 0, 0.0

    def add(self, tasks: int, seconds: float) -> None:
        self.seen += 1
        if self.seen > self.warmup:
            self.steps += 1
            self.tasks += tasks
            self.seconds += seconds

    def rate(self) -> float:
        return self.tasks / self.seconds if self.seconds > 0 else math.nan


def resume_trainer(target: str | Path, console: Console | None = None) -> Trainer:
    """A trainer continuing the run at `target`: a checkpoint, its run folder, or an MLflow run id."""
    path = Path(target)
    if not path.exists():
        from metadist.tracking import find_run_dir
        try:
            path = find_run_dir(str(target))
        except FileNotFoundError as err:
            raise CheckpointError(f"--resume {str(target)!r} is neither a checkpoint, a run folder nor a "
                                  f"known MLflow run id: {err}") from None
    state = load_checkpoint(path)
    cfg = from_dict(state["config"])
    run_dir = path if path.is_dir() else path.parent
    tracker = None
    if cfg.tracking.enabled:
        from metadist.tracking import Tracker
        tracker = Tracker(cfg, run_id=state.get("mlflow_run_id"))
    trainer = Trainer(cfg, run_dir=run_dir, console=console, tracker=tracker)
    trainer.load_state(state)
    return trainer


def evaluate_checkpoint(path, episodes=None, steps=None, console: Console | None = None) -> dict:
    """Load a checkpoint and evaluate it on its config's fixed tasks."""
    state = load_checkpoint(path)
    cfg = from_dict(state["config"])
    trainer = Trainer(cfg, run_dir=Path(path).parent if Path(path).is_file() else Path(path),
                      console=console)
    trainer.load_state(state)
    report = evaluate(trainer.model, trainer.params, cfg, trainer.tasks, episodes=episodes, steps=steps)
    print_eval(report, title=f"{cfg.name} (step {trainer.step})", console=trainer.console)
    return {"config": to_dict(cfg), "metrics": {"step": trainer.step}, "eval": report,
            "checkpoint": str(path)}
