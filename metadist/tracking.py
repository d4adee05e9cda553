"""MLflow recording of a run. Only the driver process uses this module.

The store is `tracking.uri`, else $MLFLOW_TRACKING_URI, else the store of the person who submitted the
job ($METADIST_SUBMITTER_TRACKING_URI, set by `metadist submit`), else a SQLite file `mlflow.db` in the
working directory, with artifacts in `mlruns/` beside it; no server is needed. A run records:
- params: the flattened resolved config; tags: Ray version, worker count, device kinds, the run folder;
- metrics on every logging step: meta-loss, query loss and accuracy before and after adaptation,
  tasks/s, step time split into compute / communication / driver, worker restarts; final evaluation;
- artifacts: config.yaml, checkpoints, the final model, eval.json, metrics.jsonl, and PNG plots.

Everything goes through an explicit `MlflowClient` and run id rather than mlflow's global "active run",
so a Tune trial or a test can hold several runs without them leaking into each other.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from urllib.parse import urlparse

import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from metadist import __version__
from metadist.config import flatten, to_dict
from metadist.net import unreachable
from metadist.store_uri import tracking_uri

MAX_PARAM = 6000  # MLflow's limit on a param value's length


def _artifact_root(uri: str) -> str | None:
    # A local SQLite store keeps artifacts beside the database, wherever the process runs from.
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlruns").resolve().as_uri()
    return None


class TrackingError(RuntimeError):
    """The MLflow store cannot be used: unreachable, or it refused our credentials."""


def check_store(client: MlflowClient, uri: str) -> None:
    """One cheap request, so a wrong URI or missing credentials is one clear error before training."""
    url = urlparse(uri)
    if url.scheme in ("http", "https") and url.hostname:
        # MLflow retries a dead server for minutes before it says so; a TCP probe answers at once.
        silent = unreachable(uri, default_port=80)
        if silent:
            raise TrackingError(f"nothing answers at the MLflow server {uri} ({silent.why}): start it, or check "
                                f"MLFLOW_TRACKING_URI / tracking.uri")
    try:
        client.search_experiments(max_results=1)
    except Exception as err:  # MlflowException (with the HTTP status), or requests' errors
        text = str(err)
        # MLflow turns a refused request into an error code that maps back to its HTTP status.
        status = err.get_http_status_code() if isinstance(err, MlflowException) else None
        if status == 401:
            raise TrackingError(f"the MLflow server at {uri} refused the request (401): set MLFLOW_TRACKING_USERNAME "
                                f"and MLFLOW_TRACKING_PASSWORD to a valid user") from None
        if status == 403:
            raise TrackingError(f"the MLflow server at {uri} refused these credentials (403): the user lacks "
                                f"permission") from None
        raise TrackingError(f"cannot use the MLflow store {uri}: {text.splitlines()[0][:300] if text else type(err).__name__}") from None


def log_params(client: MlflowClient, run_id: str, flat: dict) -> None:
    """A flat dict as the run's params, cut to MLflow's length limit."""
    params = [Param(k, str(v)[:MAX_PARAM]) for k, v in flat.items()]
    for i in range(0, len(params), 100):  # log_batch takes at most 100 params per call
        client.log_batch(run_id, params=params[i:i + 100])


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    """The id of experiment `name`, created (artifacts beside a local SQLite store) if it is new."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_root(uri))
    except Exception:
        # Sweep trials starting at once race to create it: the loser reads the winner's.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class Tracker:
    """One MLflow run for one training run."""

    def __init__(self, cfg, uri: str | None = None, run_id: str | None = None, parent_run_id: str | None = None,
                 run_name: str | None = None, tags: dict[str, str] | None = None):
        self.cfg = cfg
        self.uri = tracking_uri(uri or cfg.tracking.uri)
        self.client = MlflowClient(self.uri)
        if run_id is None:  # a new run: the store is asked now, before a run folder or a worker exists
            check_store(self.client, self.uri)
        self.run_id = run_id
        self.parent_run_id = parent_run_id  # a sweep's run: this run shows nested under it
        self.run_name = run_name
        self.extra_tags = dict(tags or {})
        self.baseline: dict | None = None
        self.initial_params: dict | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, trainer) -> None:
        """Create (or, on resume, reopen) the run and record the config and system information."""
        cfg = self.cfg
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            self._log_baseline(trainer)
            return
        exp_id = experiment_id(self.client, cfg.tracking.experiment or cfg.name, self.uri)
        run_name = self.run_name or trainer.run_dir.name
        tags = {"mlflow.runName": run_name, "metadist.version": __version__,
                "metadist.run_dir": str(Path(trainer.run_dir).resolve()),
                "algorithm": cfg.algorithm.name, "task_family": cfg.task.family,
                "executor": cfg.runtime.executor, "workers": str(cfg.runtime.workers), **self.extra_tags}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = self.client.create_run(exp_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        log_params(self.client, self.run_id, flatten(to_dict(cfg)))
        info = trainer.executor.describe()
        system = {"ray_version": info.get("ray_version", "-"), "workers": str(info["workers"]),
                  "device_kinds": ",".join(info.get("devices") or sorted({w["device"] for w in info["workers_info"]})),
                  "torch_version": torch.__version__}
        self.client.log_batch(self.run_id, tags=[RunTag(f"system.{k}", v) for k, v in system.items()])
        self.client.log_artifact(self.run_id, str(trainer.run_dir / "config.yaml"))
        self._log_baseline(trainer)

    def _log_baseline(self, trainer) -> None:
        # The "before meta-training" side of the adaptation plot: the initial parameters, evaluated once
        # and kept in the run folder so a resumed run draws the same curve.
        path = trainer.run_dir / "eval_initial.json"
        init_path = trainer.run_dir / "params_initial.pt"
        if path.exists() and init_path.exists():
            self.baseline = json.loads(path.read_text())
            self.initial_params = torch.load(init_path, weights_only=True)
            return
        if trainer.step != 0:
            return  # resumed without a baseline: the plots show the meta-trained curve alone
        from metadist.evaluation import evaluate
        self.initial_params = {k: v.detach().clone() for k, v in trainer.params.items()}
        torch.save(self.initial_params, init_path)
        self.baseline = evaluate(trainer.model, trainer.params, self.cfg, trainer.tasks)
        path.write_text(json.dumps(self.baseline, indent=2))

    def log_record(self, record: dict) -> None:
        """One logging step's metrics (scalars only; per-inner-step lists become `<key>_<k>`)."""
        step, now = int(record["step"]), int(time.time() * 1000)
        metrics = []
        for k, v in record.items():
            if k == "step":
                continue
            values = enumerate(v) if isinstance(v, list) else [(None, v)]
            for i, x in values:
                if isinstance(x, (int, float)) and math.isfinite(x):
                    metrics.append(Metric(k if i is None else f"{k}_{i}", float(x), now, step))
        if "loss_after" in record:
            metrics.append(Metric("meta_loss", float(record["loss_after"]), now, step))
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def checkpoint_saved(self, path: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path="checkpoints")

    def finish(self, trainer, summary: dict) -> None:
        """Final evaluation metrics, the report, the model and the plots; mark the run FINISHED."""
        from metadist import plots

        now = int(time.time() * 1000)
        report = summary["eval"]
        metrics = [Metric(f"eval_{report['metric']}_{r['steps']}", float(r["mean"]), now, trainer.step)
                   for r in report["rows"] if math.isfinite(r["mean"])]
        metrics += [Metric(f"eval_{report['metric']}_{r['steps']}_ci95", float(r["ci95"]), now, trainer.step)
                    for r in report["rows"] if math.isfinite(r["ci95"])]
        tps = summary["throughput"]["tasks_per_s"]
        if isinstance(tps, float) and math.isfinite(tps):
            metrics.append(Metric("steady_tasks_per_s", tps, now, trainer.step))
        self.client.log_batch(self.run_id, metrics=metrics)
        run_dir = Path(trainer.run_dir)
        for name in ("eval.json", "metrics.jsonl"):
            if (run_dir / name).exists():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        model_path = run_dir / "model.pt"
        torch.save({"config": to_dict(self.cfg), "params": {k: v.detach().cpu() for k, v in trainer.params.items()},
                    "buffers": {k: v.cpu() for k, v in trainer.model.named_buffers()}}, model_path)
        self.client.log_artifact(self.run_id, str(model_path), artifact_path="model")
        history = _history(run_dir)
        if history:
            self._figure(plots.training_curve(history, self.cfg.name), "plots/training_curve.png")
        reports = {"before meta-training": self.baseline} if self.baseline else {}
        reports["after meta-training"] = report
        self._figure(plots.adaptation_curve(reports, self.cfg.name), "plots/adaptation_curve.png")
        if self.cfg.task.family == "sinusoid":
            sets = {"before meta-training": self.initial_params} if self.initial_params else {}
            sets["after meta-training"] = trainer.params
            self._figure(plots.sine_fits(trainer.model, sets, self.cfg, trainer.tasks,
                                         n_tasks=self.cfg.tracking.plot_tasks), "plots/sine_fits.png")
        self.client.set_tag(self.run_id, "metadist.status", "finished")
        self.client.set_terminated(self.run_id, status="FINISHED")

    def fail(self, err: BaseException, diverged: bool = False) -> None:
        """Mark the run FAILED (KILLED on Ctrl-C), so the dashboard never shows it as running forever."""
        if self.run_id is None:
            return
        # Ctrl-C, or a Tune trial stopped early (its thread gets SystemExit): killed, not failed.
        killed = isinstance(err, (KeyboardInterrupt, SystemExit))
        try:
            if not killed:
                self.client.set_tag(self.run_id, "error", f"{type(err).__name__}: {str(err)[:500]}")
            if diverged:  # a sweep's table and MLflow filters look for this tag
                self.client.set_tag(self.run_id, "metadist.status", "diverged")
            self.client.set_terminated(self.run_id, status="KILLED" if killed else "FAILED")
        except Exception:  # the store itself may be what failed; the original error matters more
            pass

    def _figure(self, fig, name: str) -> None:
        import matplotlib.pyplot as plt

        self.client.log_figure(self.run_id, fig, name)
        plt.close(fig)


def _history(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def find_run_dir(run_id: str, uri: str | None = None) -> Path:
    """The run folder recorded for MLflow run `run_id` (for `metadist train --resume RUN_ID`)."""
    client = MlflowClient(tracking_uri(uri))
    try:
        run = client.get_run(run_id)
    except Exception as err:
        raise FileNotFoundError(f"no MLflow run {run_id!r} in {tracking_uri(uri)} ({type(err).__name__})") from None
    path = run.data.tags.get("metadist.run_dir")
    if path and (Path(path) / "checkpoint.pt").exists():
        return Path(path)
    # The folder is gone (another machine): fetch the last checkpoint logged to the run.
    dest = Path(client.download_artifacts(run_id, "checkpoints"))
    return dest


class SweepRun:
    """The parent MLflow run of a sweep: its settings, results table, best job and plots. Each trial's
    run is a child (tag `mlflow.parentRunId`); `settle_children` gives every child its outcome."""

    def __init__(self, uri: str, experiment: str, run_id: str | None = None):
        self.uri = uri
        self.client = MlflowClient(uri)
        check_store(self.client, uri)
        self.experiment_id = experiment_id(self.client, experiment, uri)
        self.run_id = run_id

    def start(self, run_name: str, sweep: dict, sweep_dir: Path, sweep_file: Path) -> str:
        tags = {"mlflow.runName": run_name, "metadist.version": __version__, "metadist.kind": "sweep",
                "metadist.sweep_dir": str(Path(sweep_dir).resolve())}
        self.run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        flat = flatten({k: v for k, v in sweep.items() if k != "space"})
        flat.update({f"space.{k}": json.dumps(v) for k, v in sweep["space"].items()})
        log_params(self.client, self.run_id, flat)
        self.client.log_artifact(self.run_id, str(sweep_file))
        return self.run_id

    def reopen(self) -> None:
        self.client.update_run(self.run_id, status="RUNNING")

    def settle_children(self, outcomes: dict[str, str]) -> None:
        """Tag each trial's child run with its outcome; close the ones a stopped trial left RUNNING."""
        children = self.client.search_runs([self.experiment_id],
                                           filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'")
        current = self._current(children)
        for run in children:
            kind = outcomes.get(run.data.tags.get("metadist.trial_id", ""), "unfinished")
            if run.info.run_id not in current:
                kind = "superseded"  # a trial retried from scratch started a new child run
            self.client.set_tag(run.info.run_id, "metadist.status", kind)
            status = {"finished": "FINISHED", "diverged": "FAILED", "error": "FAILED"}.get(kind, "KILLED")
            if run.info.status != status and run.info.status != "FINISHED":
                # A trial stopped or interrupted mid-step may have had no chance to close its run.
                self.client.set_terminated(run.info.run_id, status=status)

    @staticmethod
    def _current(children) -> set[str]:
        latest: dict[str, object] = {}
        for run in children:
            trial = run.data.tags.get("metadist.trial_id", run.info.run_id)
            if trial not in latest or run.info.start_time > latest[trial].info.start_time:
                latest[trial] = run
        return {r.info.run_id for r in latest.values()}

    def finish(self, metrics: dict[str, float], files: list[Path], plots: list[Path], status: str) -> None:
        """Log the counts and best value, the result files, and the plot PNGs (under `plots/`); close."""
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()
                                                    if isinstance(v, (int, float)) and math.isfinite(v)])
        for path in files:
            self.client.log_artifact(self.run_id, str(path))
        for path in plots:
            self.client.log_artifact(self.run_id, str(path), artifact_path="plots")
        self.client.set_terminated(self.run_id, status=status)
