"""`metadist tune`: a Ray Tune sweep in which every trial is a whole distributed metadist run.

- The trainable is a Tune function (`metadist.sweeps.trial.run_trial`). Its resources are one
  placement group per trial: bundle 0 for the trial's driver (`trial_cpus`), bundles 1..W for its worker
  actors, so a trial starts only when all of its workers fit and trials never wait on each other.
  A collective trial (`runtime.executor: collective`) has bundle 0 alone: Ray Train places its ranks
  in a placement group of its own, which Tune does not see, so Tune runs only as many such trials at
  once as the cluster holds with their ranks (`trials_at_once`). On 2 CPUs: `trial_cpus: 0.1` and
  `cpus_per_worker: 0.9` let a trial and its ranks fit where 1 + 1 per rank would wait for ever.
- Search: Tune's variant generator (random sampling, grid keys crossed) or Optuna; scheduler: ASHA on
  the validation metric against `steps_done`, or none.
- MLflow: one parent run per sweep here, one child run per trial (written by the trial's driver).
- Results: `results.parquet`, `best.yaml` and plots in the sweep folder and on the parent run.
- Ctrl-C stops the sweep after saving Tune's state; `metadist tune --resume DIR` goes on from there
  without rerunning finished trials (unfinished ones continue from their last checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import signal
from datetime import datetime
from pathlib import Path

import ray
import yaml
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.search.basic_variant import BasicVariantGenerator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from metadist.config import ConfigError
from metadist.plots import save_png
from metadist.runtime.cluster import connect
from metadist.runtime.errors import ClusterError
from metadist.sweeps import plots, results
from metadist.sweeps.plan import STATE, SweepPlan
from metadist.sweeps.trial import TrialContext, run_trial, trial_label
from metadist.store_uri import out_dir, tracking_uri
from metadist.tracking import SweepRun


class SweepInterrupted(RuntimeError):
    """The sweep stopped before every trial ended; the message says how to resume it."""


# -- Tune pieces --------------------------------------------------------------------------------
def search_space(plan: SweepPlan) -> dict:
    """Tune domains for the plan's dimensions (`search: grid` turns choices into grid searches)."""
    grid_all = plan.sweep["search"] == "grid"
    space = {}
    for key, (kind, values) in plan.space.items():
        if kind == "loguniform":
            space[key] = tune.loguniform(*values)
        elif kind == "uniform":
            space[key] = tune.uniform(*values)
        elif kind == "grid" or grid_all:
            space[key] = tune.grid_search(list(values))
        else:
            space[key] = tune.choice(list(values))
    return {"params": space}


def search_algorithm(plan: SweepPlan, limit: int | None = None):
    """The searcher, running at most `limit` trials at once (None: as many as fit)."""
    if plan.sweep["search"] != "optuna":
        # Random variants (grid keys crossed), seeded: the same sweep file samples the same trials. The
        # limit is the generator's own: Tune ignores max_concurrent_trials for it (it warns, and runs more).
        return BasicVariantGenerator(random_state=plan.job["seed"], max_concurrent=limit or 0)
    try:
        from ray.tune.search.optuna import OptunaSearch
        import optuna  # noqa: F401  (OptunaSearch imports it lazily and fails late without it)
    except ImportError:
        raise ConfigError("search: optuna needs Optuna installed: pip install 'metadist[optuna]'") from None
    searcher = OptunaSearch(seed=plan.job["seed"])
    return tune.search.ConcurrencyLimiter(searcher, max_concurrent=limit) if limit else searcher


def scheduler(plan: SweepPlan):
    if plan.sweep["scheduler"]["name"] == "none":
        return None
    return tune.schedulers.ASHAScheduler(
        time_attr="steps_done", max_t=plan.job["train"]["steps"], grace_period=plan.grace_period,
        reduction_factor=plan.sweep["scheduler"]["reduction_factor"])


def trial_bundles(plan: SweepPlan) -> list[dict]:
    """Bundle 0: the trial's driver; then one bundle per worker actor (the Ray executor takes them). A
    collective trial's driver only waits for its ranks, which Ray Train places outside this group."""
    rt = plan.job["runtime"]
    driver = {"CPU": plan.sweep["trial_cpus"]}
    if rt["executor"] == "collective":
        return [driver]
    if rt["executor"] == "local":
        if rt["device"] != "cpu" and rt["gpus_per_worker"]:
            driver["GPU"] = rt["gpus_per_worker"]
        return [driver]
    worker = {"CPU": rt["cpus_per_worker"], **({"GPU": rt["gpus_per_worker"]} if rt["gpus_per_worker"] else {})}
    return [driver] + [dict(worker) for _ in range(rt["workers"])]


def trials_at_once(plan: SweepPlan, cluster: dict) -> int | None:
    """Tune's limit on running trials: the sweep's `concurrent`, else none, except for collective trials.
    Tune reserves only their bundle 0 and would start more than the ranks' placement groups can hold;
    the ranks of the extra ones would wait until Ray Train gives up on them. So as many as the cluster's
    resources (`cluster`, Ray's totals) hold, each trial with its ranks."""
    if plan.sweep["concurrent"]:
        return plan.sweep["concurrent"]
    rt = plan.job["runtime"]
    if rt["executor"] != "collective":
        return None
    need = {"CPU": plan.sweep["trial_cpus"] + rt["workers"] * rt["cpus_per_worker"],
            "GPU": rt["workers"] * rt["gpus_per_worker"]}
    fits = min(int(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v)
    if fits < 1:
        have = ", ".join(f"{cluster.get(k, 0):g} {k}" for k in need)
        asked = " and ".join(f"{v:g} {k}" for k, v in need.items() if v)
        raise ClusterError(f"a collective trial asks for {asked} (trial_cpus + runtime.workers={rt['workers']} "
                           f"ranks of cpus_per_worker={rt['cpus_per_worker']:g}, gpus_per_worker="
                           f"{rt['gpus_per_worker']:g}); the Ray cluster has {have} in all (one that scales "
                           f"up as trials ask: set concurrent to the trials to run at once)")
    return fits


def trainable(context: TrialContext):
    return tune.with_resources(tune.with_parameters(run_trial, context=context),
                               tune.PlacementGroupFactory(trial_bundles(context.plan)))


_BAR: dict = {"bar": None, "task": None}  # the driver's progress bar; Tune pickles callbacks, not this


class _Progress(tune.Callback):
    """Advances the progress bar and logs one line per ended trial (Tune's own tables are off)."""

    def __init__(self, metric: str):
        self.metric = metric

    def _ended(self, trial, how: str) -> None:
        bar = _BAR["bar"]
        if bar is None:
            return
        last = trial.last_result or {}
        value = last.get(self.metric)
        shown = f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else "-"
        bar.advance(_BAR["task"])
        bar.console.log(f"trial {trial.trial_id} {how}: {self.metric} {shown} after {last.get('steps_done', 0)} "
                        f"steps ({trial_label(trial.config['params'])})", highlight=False)

    def on_trial_complete(self, iteration, trials, trial, **info):
        how = (trial.last_result or {}).get("outcome", "ended")
        self._ended(trial, "stopped early" if how == "running" else how)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial, f"failed ({_error_line(trial)})")


# -- the driver -----------------------------------------------------------------------------------
def _connect(sweep: dict) -> bool:
    """Join the configured cluster, the submitting job's, or start a local Ray. True if started here."""
    # The dashboard stays on: Tune trials that start their own actors hung here without it.
    # Trial output is not forwarded (log_to_driver=False, joining too): trials print nothing of their
    # own, and what Ray would forward is the noise of Tune stopping trial threads (SystemExit injected
    # mid-call); the progress lines, the table and MLflow carry the results, Ray's log files the rest.
    return connect(sweep["address"], key="address", num_cpus=os.cpu_count() or 1, object_store_mb=512,
                   dashboard=True, log_to_driver=False)


def start(plan: SweepPlan, path: Path, console: Console) -> Path:
    """Open the parent run of a planned sweep (from file `path`), run it; returns the sweep folder."""
    uri = tracking_uri(plan.job["tracking"]["uri"])  # both places are settled before anything is written
    root = out_dir(plan.sweep["out_dir"], "out_dir", "runs/sweeps", under="sweeps")
    sweep_dir = (root / f"{plan.sweep['name']}-{datetime.now():%Y%m%d-%H%M%S}").resolve()
    sweep_dir.mkdir(parents=True, exist_ok=False)
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(plan.sweep, sort_keys=False))
    parent = SweepRun(uri, plan.job["tracking"]["experiment"])
    parent.start(sweep_dir.name, plan.sweep, sweep_dir, sweep_dir / "sweep.yaml")
    state = {"plan": plan.__dict__, "tracking_uri": uri, "parent_run_id": parent.run_id,
             "sweep_file": str(Path(path).resolve())}
    (sweep_dir / STATE).write_text(json.dumps(state, indent=2))
    console.print(f"sweep folder: {sweep_dir}\nMLflow parent run {parent.run_id} in {uri}", highlight=False,
                  soft_wrap=True)
    _run(sweep_dir, plan, parent, console, restore=False)
    return sweep_dir


def resume(sweep_dir: Path, state: dict, console: Console) -> Path:
    """Go on with an interrupted sweep (`state`: its `plan.read_state`): finished trials stay as they are."""
    sweep_dir = Path(sweep_dir).resolve()
    plan = SweepPlan(**state["plan"])
    plan.space = {k: tuple(v) for k, v in plan.space.items()}
    parent = SweepRun(state["tracking_uri"], plan.job["tracking"]["experiment"], run_id=state["parent_run_id"])
    parent.reopen()
    console.print(f"resuming sweep {sweep_dir.name} (MLflow parent run {parent.run_id})", highlight=False)
    _run(sweep_dir, plan, parent, console, restore=True)
    return sweep_dir


def _run(sweep_dir: Path, plan: SweepPlan, parent: SweepRun, console: Console, restore: bool) -> None:
    # Every trial checkpoints at each report; Tune's warning about the resulting state snapshots is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's default loggers include TensorBoard's, which prints a warning for each NaN a diverged trial
    # reports; the CSV and JSON loggers (the results table reads them) are added back explicitly.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    owns_ray = _connect(plan.sweep)
    context = TrialContext(plan=plan, sweep_dir=str(sweep_dir), tracking_uri=parent.uri,
                           parent_run_id=parent.run_id)
    total = plan.sweep["samples"] * math.prod(len(v) for k, v in plan.space.values()
                                             if k == "grid" or plan.sweep["search"] == "grid")
    interrupted = False
    try:
        if restore:
            tuner = tune.Tuner.restore(str(sweep_dir), trainable(context), resume_unfinished=True,
                                       resume_errored=True)
        else:
            limit = trials_at_once(plan, ray.cluster_resources())
            tuner = tune.Tuner(
                trainable(context), param_space=search_space(plan),
                tune_config=tune.TuneConfig(metric=plan.metric, mode=plan.mode,
                                            search_alg=search_algorithm(plan, limit),
                                            scheduler=scheduler(plan), num_samples=plan.sweep["samples"]),
                run_config=tune.RunConfig(
                    name=sweep_dir.name, storage_path=str(sweep_dir.parent), verbose=0,
                    callbacks=[_Progress(plan.metric), CSVLoggerCallback(), JsonLoggerCallback()],
                    failure_config=tune.FailureConfig(max_failures=plan.sweep["max_failures"]),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=3)))
        done = len([t for t in _read_trials(sweep_dir) if t.status in ("TERMINATED", "ERROR")]) if restore else 0
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, refresh_per_second=2) as bar:
            _BAR.update(bar=bar, task=bar.add_task("trials", total=total, completed=done))
            try:
                tuner.fit()
            finally:
                _BAR.update(bar=None, task=None)
        trials = _read_trials(sweep_dir)
        interrupted = any(t.status not in ("TERMINATED", "ERROR") for t in trials) or len(trials) < total
        _finish(sweep_dir, plan, parent, trials, console, interrupted)
    except KeyboardInterrupt:
        interrupted = True
        parent.client.set_terminated(parent.run_id, status="KILLED")
    except Exception:
        parent.client.set_terminated(parent.run_id, status="FAILED")  # not left RUNNING for ever
        raise
    finally:
        if owns_ray:
            ray.shutdown()
    if interrupted:
        raise SweepInterrupted(f"the sweep was interrupted; resume it with:  metadist tune --resume {sweep_dir}")


SHARED_STORAGE_HINT = ("the sweep folder is not on storage every node sees: on a multi-node cluster set "
                       "out_dir to a shared filesystem mounted on every node (docs/deploy.md, step 6)")


def _error_line(trial) -> str:
    """The last line of a failed trial's traceback, which Tune keeps in the trial's error file."""
    path = Path(trial.error_file) if trial.error_file else None
    text = path.read_text() if path and path.exists() else ""
    if "Unable to set up cluster storage" in text:
        # Tune checkpoints from the trial's node into out_dir: a node-local folder fails there, in a
        # message many lines long whose last line is a link. Matched by text: ray 2.60.0 raises it as a
        # plain RuntimeError (ray.train's StorageContext), and the trial's error file is text.
        return SHARED_STORAGE_HINT
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "see the trial's error file"


def _read_trials(sweep_dir: Path) -> list[results.TrialRecord]:
    analysis = tune.ExperimentAnalysis(str(sweep_dir))
    frames = analysis.trial_dataframes
    out = []
    for trial in analysis.trials:
        frame = frames.get(trial.trial_id)
        history = frame.to_dict("records") if frame is not None else []
        error = _error_line(trial) if trial.status == "ERROR" else None
        out.append(results.TrialRecord(trial_id=trial.trial_id, status=trial.status,
                                             params=dict(trial.config.get("params", {})),
                                             last=dict(trial.last_result or {}), history=history, error=error))
    return out


def _finish(sweep_dir: Path, plan: SweepPlan, parent: SweepRun, trials, console: Console, interrupted: bool) -> None:
    """The table, Parquet, best job, plots; child runs settled; the parent run closed."""
    table = results.rows(trials, plan)
    name = plan.sweep["name"]
    results.print_table(table, plan, console, title=f"{sweep_dir.name}: {plan.metric} ({plan.mode})")
    files = [sweep_dir / "results.parquet"]
    results.write_parquet(table, files[0])
    best = results.best(table, plan)
    if best is not None:
        (sweep_dir / "best.yaml").write_text(results.best_job_yaml(plan, best, name))
        files.append(sweep_dir / "best.yaml")
        console.print(f"best: trial {best['trial']} {plan.metric} = {best[plan.metric]:.4g} "
                      f"({trial_label({k: best[k] for k in plan.space})}); job file {sweep_dir / 'best.yaml'}",
                      highlight=False, soft_wrap=True)
    outcomes = {r["trial"]: r["outcome"] for r in table}
    labels = {t.trial_id: f"{t.trial_id.rsplit('_', 1)[-1]} {trial_label(t.params)}" for t in trials}
    curves = {labels[t.trial_id]: [(int(h.get("steps_done") or 0), float(h[plan.metric])) for h in t.history
                                   if isinstance(h.get(plan.metric), (int, float))] for t in trials}
    figures = {"learning_curves.png": plots.sweep_curves(
        curves, {labels[k]: v for k, v in outcomes.items()}, plan.metric, name, plan.mode)}
    x = "inner.lr" if "inner.lr" in plan.space else next(
        (k for k, (kind, _) in plan.space.items() if kind == "loguniform"), None)
    if x is not None:
        figures[f"{plan.metric}_vs_{x}.png"] = plots.sweep_scatter(table, plan.metric, plan.mode, name, x=x)
    # Rendered once: the sweep folder's PNGs are what the parent run gets.
    pngs = [save_png(fig, sweep_dir / fname) for fname, fig in figures.items()]
    parent.settle_children(outcomes)
    counts = {f"trials_{k}": sum(r["outcome"] == k for r in table) for k in results.ORDER}
    metrics = {**counts, **({f"best_{plan.metric}": best[plan.metric]} if best else {})}
    parent.finish(metrics, files, pngs, status="KILLED" if interrupted else "FINISHED")
    console.print(f"results: {files[0]}  ({len(table)} trials: "
                  f"{', '.join(f'{v} {k[7:]}' for k, v in counts.items() if v)})", highlight=False, soft_wrap=True)


def install_sigterm_as_interrupt() -> None:
    """`kill PID` stops the sweep like Ctrl-C does (Tune saves its state and the sweep can resume)."""
    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))

