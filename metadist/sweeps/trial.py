"""One Ray Tune trial: a whole metadist run (its driver here, its worker actors in the trial's bundles).

The trial runs `Trainer.fit` with the sampled config. Every validation (`train.eval_every`, set by the
sweep's `report_every`) writes a checkpoint and reports the validation metrics to Tune with it, so ASHA
can stop the trial and a failed or interrupted trial resumes from there (`tune.get_checkpoint`). The
MLflow child run id travels inside the checkpoint, so a resumed trial continues the same child run.

Every report carries `outcome`: `running` on validations, `finished` with the final evaluation, or
`diverged` when the meta-loss or the validation metric became NaN/inf; the sweep's driver builds its
table from these. A diverged trial ends normally (Tune marks it TERMINATED), so the sweep goes on.

With `runtime.executor: collective` the trial is the driver of a Ray Train group (`collective.fit`),
whose ranks run the outer loop. The validation reports then come from the ranks: after each validation
every rank saves the checkpoint and reports it to Ray Train with the trial's metrics (the report is a
barrier, so every rank makes it, at the same steps), and the group's TuneReportCallback passes rank 0's
on to Tune, where ASHA reads them as it reads any trial's. The group's other reports (its periodic
checkpoints, the final one) stay Ray Train's. The final evaluation is reported by the trial itself,
once the group is done. A retried or resumed trial continues from the checkpoint in its run folder.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from rich.console import Console

from metadist.runtime.checkpoint import load_checkpoint, write_text_atomically
from metadist.runtime.driver import Callback, Trainer
from metadist.runtime.errors import TrainingDiverged
from metadist.sweeps.plan import SweepPlan, short_names
from metadist.tracking import Tracker


@dataclass
class TrialContext:
    """What every trial of one sweep shares (passed once through the object store)."""

    plan: SweepPlan
    sweep_dir: str  # absolute: Tune runs trials in their own working directories
    tracking_uri: str
    parent_run_id: str


def trial_label(params: dict) -> str:
    """A short run name from the sampled values: `fomaml lr=0.0123 steps=5`."""
    names = short_names(list(params))
    parts = []
    for key, value in params.items():
        text = f"{value:.3g}" if isinstance(value, float) else str(value)
        parts.append(text if key == "algorithm.name" else f"{names[key]}={text}")
    return " ".join(parts)


FINAL = "final_report.json"
"""In a trial's folder: the final report, written just before it goes to Tune."""


def run_trial(config: dict, context: TrialContext) -> None:
    """The Tune function trainable: meta-train one sampled config and report to Tune."""
    for name in ("ray.train", "ray.tune"):  # "checkpoint created" at every report drowns the sweep's output
        logging.getLogger(name).setLevel(logging.WARNING)
    params = config["params"]
    cfg = context.plan.trial_config(params)
    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(context.sweep_dir) / "trials" / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)

    done = run_dir / FINAL
    if done.exists():
        # The trial had finished (its MLflow run closed, its final report written) when the sweep was
        # interrupted before Tune recorded the report: report it again rather than train again.
        tune.report(json.loads(done.read_text()))
        return

    collective = cfg.runtime.executor == "collective"
    state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(Path(folder) / "checkpoint.pt")
    elif collective and (run_dir / "checkpoint.pt").exists():  # Tune holds no checkpoint of a group's
        state = load_checkpoint(run_dir / "checkpoint.pt")
    tracker = Tracker(cfg, uri=context.tracking_uri, parent_run_id=context.parent_run_id,
                      run_id=state.get("mlflow_run_id") if state else None,
                      run_name=f"{trial_id} {trial_label(params)}", tags={"metadist.trial_id": trial_id})
    # Quiet: the sweep's driver prints one line per trial; this run's record is its MLflow child run.
    trainer = Trainer(cfg, run_dir=run_dir, console=Console(stderr=True, quiet=True), tracker=tracker)
    if state is not None:
        trainer.load_state(state)
    metric = context.plan.metric

    def report(trainer: Trainer) -> None:
        if not _validated(trainer, metric):
            return  # the last validation goes out with the final evaluation, in one report
        path = trainer.save()
        with tempfile.TemporaryDirectory(prefix="metadist-ckpt-") as folder:
            _link_or_copy(path, Path(folder) / "checkpoint.pt")
            tune.report(_finite(_metrics(trainer, "running")),
                        checkpoint=tune.Checkpoint.from_directory(folder))

    try:
        if collective:
            from metadist.runtime import collective as group  # the ranks report; this process waits

            trainer.rank_callbacks.append(Callback(trainer.validation_cadence,
                                                   functools.partial(_rank_report, metric=metric)))
            summary = group.fit(trainer, progress=False, callbacks=(_ForwardValidations(),))
        else:
            trainer.callbacks.append(Callback(trainer.validation_cadence, report))  # after each validation
            summary = trainer.fit(progress=False)
    except TrainingDiverged as err:
        # NaN: searchers read it as a failed trial (Optuna needs the key in every report), ASHA skips it.
        steps = max(trainer.step, _steps_by_rank0(run_dir)) if collective else trainer.step
        tune.report({"steps_done": steps, "outcome": "diverged", metric: math.nan, "error": str(err)[:300]})
        return
    final = _metrics(trainer, "finished")
    report_ = summary["eval"]
    for row in report_["rows"]:
        final[f"eval_{report_['metric']}_{row['steps']}"] = row["mean"]
    final[f"eval_{report_['metric']}"] = report_["rows"][-1]["mean"]
    final["mlflow_run_id"] = tracker.run_id
    final = _finite(final)
    write_text_atomically(done, json.dumps(final))  # a resumed trial reads a whole report or none
    tune.report(final)


def _steps_by_rank0(run_dir: Path) -> int:
    """The steps a collective group has completed (its ranks ran them, not this process): rank 0's count
    in the progress file it replaces each step, 0 if it wrote none."""
    from metadist.runtime.collective import PROGRESS

    try:
        return int(json.loads((run_dir / PROGRESS).read_text())["step"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def _validated(trainer: Trainer, metric: str) -> bool:
    """After a validation: whether it is one to report now (not the last, which goes out with the final
    evaluation); TrainingDiverged if the metric is not finite."""
    value = trainer.last_validation.get(metric)
    if isinstance(value, float) and not math.isfinite(value):
        # Every validation task blew up (a huge inner lr, at test time) while the meta-loss stayed finite.
        raise TrainingDiverged(f"{metric} is not finite at step {trainer.step}: every validation task "
                               f"diverged (inner.lr={trainer.cfg.inner.lr})")
    return trainer.step < trainer.cfg.train.steps


def _rank_report(trainer: Trainer, metric: str) -> None:
    """A collective trial's report, on every rank after each validation: the checkpoint, with the trial's
    metrics, to Ray Train, whose TuneReportCallback passes rank 0's on to Tune. Every rank validates the
    same parameters on the same tasks, so every rank meets a diverged metric alike and ends the group."""
    if not _validated(trainer, metric):
        return
    trainer.executor.report_metrics = _finite(_metrics(trainer, "running"))
    try:
        trainer.save()
    finally:
        trainer.executor.report_metrics = {}  # the group's own checkpoint reports stay Ray Train's


class _ForwardValidations(TuneReportCallback):
    """Passes to Tune the ranks' reports of validations (they carry `outcome`), not the collective
    group's own checkpoint reports, which hold no validation metric and would be taken for results."""

    def after_report(self, run_context, metrics, checkpoint):
        if "outcome" in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def _metrics(trainer: Trainer, outcome: str) -> dict:
    """The latest validation values plus progress: what Tune, ASHA and the table read."""
    latest: dict = {}
    for r in trainer.history:  # the last value of every scalar logged so far, the latest validation included
        latest.update({k: v for k, v in r.items() if isinstance(v, (int, float))})
    latest.pop("step", None)
    # The driver of a collective group ran no step itself: its last meta-loss is the last one logged.
    loss = trainer.last_loss if math.isfinite(trainer.last_loss) else latest.get("loss_after", math.nan)
    return {**latest, "steps_done": trainer.step, "meta_loss": loss, "outcome": outcome,
            "mlflow_run_id": trainer.tracker.run_id if trainer.tracker else None}


def _finite(metrics: dict) -> dict:
    # NaN/inf values of a running trial (a meta-loss that blew up for a moment) are left out: the
    # table reads a missing value as NaN, and searchers must not take them for the trial's score.
    return {k: v for k, v in metrics.items() if not (isinstance(v, float) and not math.isfinite(v))}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # the checkpoint is written atomically and never modified in place
    except OSError:
        shutil.copy2(src, dst)
