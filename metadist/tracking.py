"""MLflow recording of a run. Only the driver process uses this module.

The store is `tracking.uri`, else $MLFLOW_TRACKING_URI, else the store of the person who submitted the
job ($METADIST_SUBMITTER_TRACKING_URI, set by `metadist submit`), else a SQLite file `mlflow.db` in the
working directory, with artifacts in `mlruns/` beside it; no server is needed. The driver computes
everything; a `Tracker` records what it is handed:
- params: the flattened resolved config; tags: Ray version, worker count, device kinds, the run folder;
- dataset inputs: the task source of each split the run reads, with a digest (the shards' hashes, or the
  task family's parameters for procedural tasks);
- metrics, grouped by prefix (`metric_name`): `train/` meta-loss, query loss and accuracy before and
  after adaptation; `time/` tasks/s and the step time split into compute / communication / driver;
  `val/` validation; `runtime/` worker restarts; and the headline `test/metric` with its CI;
- artifacts: config.yaml, checkpoints, the final model, eval.json, the evaluation rows as a table
  (eval_table.json), metrics.jsonl, and PNG plots.

Everything goes through an explicit `MlflowClient` and run id rather than mlflow's global "active run",
so a Tune trial or a test can hold several runs without them leaking into each other.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from urllib.parse import urlparse

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from metadist import __version__
from metadist.config import flatten, to_dict
from metadist.errors import UserError
from metadist.evaluation import lower_is_better
from metadist.net import unreachable
from metadist.store_uri import tracking_uri

MAX_PARAM = 6000  # MLflow's limit on a param value's length
EXPERIMENT_KIND = "mlflow.experimentKind"  # read by the MLflow 3.17 UI (no constant for it in the client)


def _artifact_root(uri: str) -> str | None:
    # A local SQLite store keeps artifacts beside the database, wherever the process runs from.
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlruns").resolve().as_uri()
    return None


class TrackingError(UserError, RuntimeError):
    """The MLflow store cannot be used: unreachable, or it refused our credentials."""


def open_client(uri: str) -> MlflowClient:
    """A client of the store at `uri`; a store MLflow refuses to open is one clear error."""
    try:
        return MlflowClient(uri)
    except MlflowException as err:
        # For example a file: store, which MLflow 3.17 refuses unless MLFLOW_ALLOW_FILE_STORE is set.
        raise TrackingError(f"cannot use the MLflow store {uri}: {str(err).splitlines()[0][:300]}") from None


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


# The runs table a reviewer opens: the headline metric and the swept keys as columns. MLflow's UI keeps
# column choices in the browser, except for a "shared view" stored as an experiment tag and opened with
# `?viewStateShareKey=<key>` (the key and state layout are those of the MLflow 3.17 UI).
REVIEW_VIEW = "metadist"
_VIEW_STATE = {
    "selectedColumns": ["attributes.`Dataset`", "tags.`algorithm`", "params.`inner.lr`", "params.`inner.steps`",
                        "metrics.`test/metric`", "metrics.`test/metric_ci95`", "metrics.`time/steady_tasks_per_s`"],
    "columnOrder": [], "columnWidths": {}, "runsExpanded": {}, "runsPinned": [], "runsHidden": [],
    "runsVisibilityMap": {}, "runsHiddenMode": "FIRST_10_RUNS", "viewMaximized": False, "runListHidden": False,
    "isAccordionReordered": False, "useGroupedValuesInCharts": True, "hideEmptyCharts": True, "groupBy": None,
    "groupsExpanded": {}, "autoRefreshEnabled": True,
    "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""}}
EXPERIMENT_TAGS = {
    # The kind makes MLflow 3's UI treat the experiment as model training (runs, charts, datasets) rather
    # than as GenAI development (traces), which it otherwise guesses for an experiment without traces.
    EXPERIMENT_KIND: "custom_model_development",
    f"mlflow.sharedViewState.{REVIEW_VIEW}": json.dumps(_VIEW_STATE),
}


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    """The id of experiment `name`, created (artifacts beside a local SQLite store) if it is new, with the
    tags that lay it out for review (`EXPERIMENT_TAGS`; added to an existing experiment that lacks them)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_root(uri), tags=EXPERIMENT_TAGS)
        except Exception:
            # Sweep trials starting at once race to create it: the loser reads the winner's.
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    for key, value in EXPERIMENT_TAGS.items():
        if exp.tags.get(key) != value:
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def review_links(experiment: str, run_id: str | None = None, ui: str = "http://127.0.0.1:5000") -> list[str]:
    """The MLflow UI pages to open: the experiment's runs table in the review view, and the run's page."""
    ml = "workflowType=machine_learning"  # the UI's model-training mode (it defaults to GenAI)
    links = [f"{ui}/#/experiments/{experiment}/runs?viewStateShareKey={REVIEW_VIEW}&{ml}"]
    if run_id:
        links.append(f"{ui}/#/experiments/{experiment}/runs/{run_id}?{ml}")
    return links


def metric_name(key: str) -> str:
    """The MLflow name of a record key, grouped by prefix so the UI lays the charts out in sections:
    `train/` (meta-training), `val/` (validation during training), `time/` (step times, throughput),
    `runtime/` (worker restarts); `test/` holds the final evaluation."""
    if key.startswith("val_"):
        return "val/" + key[len("val_"):]
    if key.startswith("time_"):
        return "time/" + key[len("time_"):]
    if key == "tasks_per_s":
        return "time/tasks_per_s"
    if key == "worker_restarts":
        return "runtime/worker_restarts"
    return "train/" + key


HEADLINE = "test/metric"
"""One name across task families for how good a run is: the test metric after `eval.steps` test-time
steps (MSE for regression, accuracy in % for classification; the run's `metadist.metric` tag says
which), with `test/metric_ci95` beside it. The runs table and chart view compare runs on it."""


class Tracker:
    """One MLflow run for one training run: a sink that records what the driver hands it."""

    def __init__(self, cfg, uri: str | None = None, run_id: str | None = None, parent_run_id: str | None = None,
                 run_name: str | None = None, tags: dict[str, str] | None = None):
        self.cfg = cfg
        self.uri = tracking_uri(uri or cfg.tracking.uri)
        self.client = open_client(self.uri)
        if run_id is None:  # a new run: the store is asked now, before a run folder or a worker exists
            check_store(self.client, self.uri)
        self.run_id = run_id
        self.parent_run_id = parent_run_id  # a sweep's run: this run shows nested under it
        self.run_name = run_name
        self.extra_tags = dict(tags or {})
        self.experiment_id: str | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, run_dir: Path, system: dict[str, str], datasets: list[dict]) -> None:
        """Create the run (or, on resume, reopen it) and record the config, the system information and
        the datasets read (`name`, `split`, `digest`, `source`, `source_type`, `profile` each)."""
        cfg = self.cfg
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            self.experiment_id = self.client.get_run(self.run_id).info.experiment_id
            return
        exp_id = self.experiment_id = experiment_id(self.client, cfg.tracking.experiment or cfg.name, self.uri)
        run_name = self.run_name or Path(run_dir).name
        tags = {"mlflow.runName": run_name, "metadist.version": __version__,
                "metadist.run_dir": str(Path(run_dir).resolve()),
                "algorithm": cfg.algorithm.name, "task_family": cfg.task.family,
                "executor": cfg.runtime.executor, "workers": str(cfg.runtime.workers), **self.extra_tags}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = self.client.create_run(exp_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        log_params(self.client, self.run_id, flatten(to_dict(cfg)))
        self.client.log_batch(self.run_id, tags=[RunTag(f"system.{k}", str(v)) for k, v in system.items()])
        inputs = [DatasetInput(Dataset(name=d["name"], digest=d["digest"], source_type=d["source_type"],
                                       source=d["source"], profile=d.get("profile")),
                               tags=[InputTag(MLFLOW_DATASET_CONTEXT, d["split"])]) for d in datasets]
        try:
            self.client.log_inputs(self.run_id, datasets=inputs)
        except MlflowException:
            # The trials of a sweep log the same datasets at the same moment. MLflow's store (3.17.2)
            # looks a dataset up and then inserts it, so the later of two inserts fails on the unique
            # key; by then the dataset exists and a second call links the run to it. An error that is
            # not that one fails again here.
            self.client.log_inputs(self.run_id, datasets=inputs)
        self.client.log_artifact(self.run_id, str(Path(run_dir) / "config.yaml"))

    def log_record(self, record: dict) -> None:
        """One record's metrics at its step (scalars only; per-inner-step lists become `<key>_<k>`)."""
        step, now = int(record["step"]), int(time.time() * 1000)
        metrics = []
        for k, v in record.items():
            if k == "step":
                continue
            values = enumerate(v) if isinstance(v, list) else [(None, v)]
            for i, x in values:
                if isinstance(x, (int, float)) and math.isfinite(x):
                    metrics.append(Metric(metric_name(k if i is None else f"{k}_{i}"), float(x), now, step))
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def checkpoint_saved(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path="checkpoints")

    def finish(self, step: int, report: dict, *, files: dict[str, Path], model: Path, figures: dict,
               tasks_per_s: float) -> None:
        """The final evaluation (the headline metric, and its rows as a table), the run's files, the model
        and the figures; then mark the run FINISHED."""
        import matplotlib.pyplot as plt

        now = int(time.time() * 1000)
        rows = report["rows"]
        final = rows[-1]
        values = {HEADLINE: final["mean"], f"{HEADLINE}_ci95": final["ci95"],
                  "time/steady_tasks_per_s": tasks_per_s}
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()
                                                    if isinstance(v, (int, float)) and math.isfinite(v)],
                              tags=[RunTag("metadist.metric", f"{report['metric']} after {final['steps']} "
                                           f"test-time steps on {report['episodes']} {report['split']} tasks "
                                           f"({'lower' if lower_is_better(report['metric']) else 'higher'} is better)")])
        self.client.log_table(self.run_id, data={k: [r.get(k) for r in rows] for k in rows[0]},
                              artifact_file="eval_table.json")
        for path in files.values():
            if Path(path).exists():
                self.client.log_artifact(self.run_id, str(path))
        self.client.log_artifact(self.run_id, str(model), artifact_path="model")
        for name, fig in figures.items():
            self.client.log_figure(self.run_id, fig, name)
            plt.close(fig)
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


def find_run_dir(run_id: str, uri: str | None = None) -> Path:
    """The run folder recorded for MLflow run `run_id` (for `metadist train --resume RUN_ID`)."""
    client = open_client(tracking_uri(uri))
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
        self.client = open_client(uri)
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
