"""The in-process trainer: the reference executor the Ray runtime is measured against.

`Trainer.fit` is the whole outer loop. Each step draws the meta-batch, computes the summed
meta-gradients (`compute`, the only part an executor replaces), divides by the task count and takes
the outer step. Logging, checkpoints and evaluation are named steps around it.
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

from metadist.algorithms import ALGORITHMS, init_meta_params, make_spec
from metadist.algorithms import batching
from metadist.config import Config, ConfigError, dump_config, to_dict
from metadist.evaluation import evaluate, print_eval
from metadist.models import build_model
from metadist.models.conv4 import update_running_stats
from metadist.runtime.checkpoint import load_checkpoint, save_checkpoint
from metadist.tasks import build_tasks


class TrainingDiverged(RuntimeError):
    """The meta-gradient became NaN or infinite."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device: 'cuda' was asked for, but torch sees no CUDA device here; "
                          "allowed here: 'cpu' or 'auto'")
    return torch.device(name)


def new_run_dir(cfg: Config) -> Path:
    """A fresh folder `<train.out_dir>/<name>-<timestamp>` for this run's files."""
    base = Path(cfg.train.out_dir) / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    path.mkdir(parents=True)
    return path


class Trainer:
    """Holds the meta-parameters, the outer optimizer and the task source of one run."""

    def __init__(self, cfg: Config, run_dir: Path | None = None, console: Console | None = None):
        self.cfg = cfg
        self.console = console or Console(stderr=True)
        if cfg.runtime.threads:
            torch.set_num_threads(cfg.runtime.threads)
        self.device = resolve_device(cfg.runtime.device)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg).to(self.device)
        self.params = {n: p.to(self.device) for n, p in init_meta_params(self.model, cfg).items()}
        for p in self.model.parameters():
            p.requires_grad_(False)  # the model only carries structure and buffers; params are explicit
        opt_cls = torch.optim.Adam if cfg.outer.optimizer == "adam" else torch.optim.SGD
        self.optimizer = opt_cls(list(self.params.values()), lr=cfg.outer.lr)
        self.scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=cfg.train.steps, eta_min=cfg.outer.min_lr) if cfg.outer.cosine else None)
        self.algorithm = ALGORITHMS[cfg.algorithm.name]
        self.tasks = build_tasks(cfg)
        self.step = 0
        self.last_loss = math.nan
        self.task_parallel = cfg.algorithm.task_parallel
        self.history: list[dict] = []
        self.run_dir = run_dir or new_run_dir(cfg)

    # -- the outer loop ---------------------------------------------------------------------------
    def fit(self, progress: bool = True) -> dict:
        """Meta-train until `train.steps`, then evaluate; returns the run summary."""
        cfg = self.cfg
        (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        timer = Throughput(cfg.train.warmup_steps)
        with self._progress(progress) as bar:
            task = bar.add_task("meta-train", total=cfg.train.steps, completed=self.step, loss=math.nan)
            while self.step < cfg.train.steps:
                t0 = time.perf_counter()
                record = self.train_step()
                timer.add(cfg.train.meta_batch, time.perf_counter() - t0)
                if record is not None:
                    record["tasks_per_s"] = timer.rate()
                    self.log(record)
                if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0:
                    self.save()
                bar.update(task, completed=self.step, loss=self.last_loss)
        checkpoint = self.save()
        report = self.evaluate()
        return self.summary(report, timer, checkpoint)

    def train_step(self) -> dict | None:
        """One outer step. Returns the averaged metrics on logging steps, else None."""
        cfg, step = self.cfg, self.step
        track = step % cfg.train.log_every == 0 or step == cfg.train.steps - 1
        batch = self.tasks.sample(step, range(cfg.train.meta_batch), cfg.task.shots, cfg.task.query)
        # Pre-adaptation metrics cost a query forward per task: only on the steps that log them.
        spec = make_spec(cfg, step, track=track).with_(report_before=track)
        grads, sums = self.compute(batch.to(self.device), spec)
        n = sums.pop("tasks")
        self.last_loss = (sums["loss_after"] / n).item()
        lr_outer = self.optimizer.param_groups[0]["lr"]  # the rate this step uses, before the schedule moves
        self.outer_step(grads, sums, n)
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

    def compute(self, batch, spec):
        """Summed meta-gradients and metrics for a batch; the part a distributed executor replaces."""
        if self.task_parallel == "auto":
            self.task_parallel = batching.choose_task_parallel(self.algorithm, self.model, self.params, batch, spec)
            self.console.log(f"task_parallel=auto chose {self.task_parallel} (measured on this batch)")
        return self.algorithm(self.model, self.params, batch, spec.with_(task_parallel=self.task_parallel))

    def outer_step(self, grads: dict, sums: dict, n: torch.Tensor) -> None:
        """Mean meta-gradient -> outer optimizer step; fold BatchNorm statistics in per_step mode."""
        for name, p in self.params.items():
            p.grad = grads[name] / n
        if not all(torch.isfinite(p.grad).all() for p in self.params.values()):
            raise TrainingDiverged(
                f"the meta-gradient is not finite at step {self.step}; the inner loop diverged "
                f"(inner.lr={self.cfg.inner.lr}, outer.lr={self.cfg.outer.lr}): lower one of them")
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if "bn_mean" in sums:
            update_running_stats(self.model, sums["bn_mean"] / n, sums["bn_var"] / n,
                                 self.cfg.model.bn_momentum)

    # -- around the loop ----------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        self.history.append(record)
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def state(self) -> dict:
        return {
            "config": to_dict(self.cfg),
            "step": self.step,
            "params": {k: v.detach().cpu() for k, v in self.params.items()},
            "buffers": {k: v.cpu() for k, v in self.model.named_buffers()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "torch_rng": torch.get_rng_state(),
            "task_parallel": self.task_parallel,
        }

    def save(self) -> Path:
        return save_checkpoint(self.run_dir / "checkpoint.pt", self.state())

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

    def evaluate(self, episodes: int | None = None, steps: int | None = None) -> dict:
        report = evaluate(self.model, self.params, self.cfg, self.tasks, episodes=episodes, steps=steps)
        (self.run_dir / "eval.json").write_text(json.dumps(report, indent=2))
        print_eval(report, title=self.cfg.name, console=self.console)
        return report

    def summary(self, report: dict, timer: "Throughput", checkpoint: Path) -> dict:
        final = self.history[-1] if self.history else {}
        return {
            "config": to_dict(self.cfg),
            "metrics": {k: v for k, v in final.items() if not isinstance(v, list)},
            "throughput": {"tasks_per_s": timer.rate(), "steps_timed": timer.steps,
                           "task_parallel": self.task_parallel},
            "eval": report,
            "checkpoint": str(checkpoint),
            "run_dir": str(self.run_dir),
        }

    def _progress(self, enabled: bool) -> Progress:
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("meta-loss {task.fields[loss]:.4f}"), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=self.console, disable=not enabled,
                        refresh_per_second=4)


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


def evaluate_checkpoint(path, episodes=None, steps=None, console: Console | None = None) -> dict:
    """Load a checkpoint and evaluate it on its config's fixed tasks."""
    from metadist.config import from_dict

    state = load_checkpoint(path)
    cfg = from_dict(state["config"])
    trainer = Trainer(cfg, run_dir=Path(path).parent if Path(path).is_file() else Path(path),
                      console=console)
    trainer.load_state(state)
    report = evaluate(trainer.model, trainer.params, cfg, trainer.tasks, episodes=episodes, steps=steps)
    print_eval(report, title=f"{cfg.name} (step {trainer.step})", console=trainer.console)
    return {"config": to_dict(cfg), "metrics": {"step": trainer.step}, "eval": report,
            "checkpoint": str(path)}
