"""Which MLflow store a run records to, and the checks made before the first request."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST
from mlflow.tracking import MlflowClient

from metadist.runtime.submit import job_env
from metadist.store_uri import OUT_DIR, SUBMITTER_URI, PlaceError, out_dir, ray_job_package, tracking_uri
from metadist.tracking import TrackingError, check_store

from ..conftest import ROOT, free_port


def test_store_precedence(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(SUBMITTER_URI, raising=False)
    assert tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv(SUBMITTER_URI, "sqlite:///submitter.db")
    assert tracking_uri() == "sqlite:///submitter.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://cluster:5000")  # a cluster's own store wins
    assert tracking_uri() == "http://cluster:5000"
    assert tracking_uri("http://configured:5000") == "http://configured:5000"


def test_a_ray_job_never_writes_into_rays_copy_of_its_working_dir(monkeypatch, tmp_path):
    # Where Ray unpacks a submitted working directory, and a job runs.
    package = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0a1b"
    (package / "jobs").mkdir(parents=True)
    monkeypatch.chdir(package / "jobs")
    for name in ("MLFLOW_TRACKING_URI", SUBMITTER_URI, OUT_DIR):
        monkeypatch.delenv(name, raising=False)
    assert ray_job_package() == package
    with pytest.raises(PlaceError, match="this Ray job has no MLflow store: ./mlflow.db would be in Ray's "
                                         "temporary copy.*set MLFLOW_TRACKING_URI"):
        tracking_uri()
    with pytest.raises(PlaceError, match="sqlite:///mlflow.db: it would be in"):
        tracking_uri("sqlite:///mlflow.db")  # relative: in the job's working directory
    with pytest.raises(PlaceError, match="no output folder: ./runs would be in .*set METADIST_OUT_DIR"):
        out_dir(None, "train.out_dir", "runs")
    with pytest.raises(PlaceError, match="train.out_dir=runs: it would be in"):
        out_dir("runs", "train.out_dir", "runs")
    # The cluster's settings (cluster/start-head.sh puts them in the head's environment) are taken.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv(OUT_DIR, str(tmp_path / "runs"))
    assert tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert out_dir(None, "train.out_dir", "runs") == tmp_path / "runs"
    assert out_dir(None, "out_dir", "runs/sweeps", under="sweeps") == tmp_path / "runs" / "sweeps"
    assert out_dir(str(tmp_path / "mine"), "train.out_dir", "runs") == tmp_path / "mine"
    # Outside a job: the same precedence, with ./runs last.
    monkeypatch.chdir(tmp_path)
    assert ray_job_package() is None and out_dir(None, "train.out_dir", "runs") == tmp_path / "runs"
    monkeypatch.delenv(OUT_DIR)
    assert out_dir(None, "train.out_dir", "runs") == Path("runs")


def test_submitted_jobs_get_the_submitters_store_as_a_fallback_only(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # a laptop's port-forward
    assert job_env() == {SUBMITTER_URI: "http://127.0.0.1:5000"}
    assert job_env("http://mlflow.internal:5000") == {"MLFLOW_TRACKING_URI": "http://mlflow.internal:5000"}


def test_a_server_nobody_runs_is_one_error_at_once():
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingError, match=f"nothing answers at the MLflow server {uri}"):
        check_store(MlflowClient(uri), uri)
    assert time.monotonic() - start < 5  # not MLflow's minutes of retries


@pytest.mark.parametrize("error, message", [
    # Read by MLflow's error code (the HTTP status), not by words in the message: the old text match
    # missed the first and took the second for a refused login.
    (RestException({"error_code": "PERMISSION_DENIED", "message": "no access to experiments"}), r"refused these credentials \(403\)"),
    (RestException({"error_code": "UNAUTHENTICATED", "message": "bad token"}), r"refused the request \(401\)"),
    (MlflowException("experiment 401 was not found", error_code=RESOURCE_DOES_NOT_EXIST), "cannot use the MLflow store"),
    (ConnectionError("proxy said 401"), "cannot use the MLflow store .*: proxy said 401"),
])
def test_a_refused_request_is_named_by_its_status(error, message):
    class Refusing:
        def search_experiments(self, **_):
            raise error

    with pytest.raises(TrackingError, match=message):
        check_store(Refusing(), "sqlite:///unused.db")


def test_submitting_loads_no_mlflow():
    # The submitter only names a store for the job; MLflow (seconds to import) is the job's business.
    code = ("import sys, json\n"
            "import metadist.runtime.submit\n"
            "from typer.testing import CliRunner\n"
            "from metadist.cli import app\n"
            "runner = CliRunner()\n"
            "codes = [runner.invoke(app, ['submit', '--help']).exit_code,\n"
            "         runner.invoke(app, ['submit', 'jobs/sine/maml-debug.yaml', '--address', 'http://127.0.0.1:9']).exit_code]\n"
            "print(json.dumps({'codes': codes, 'mlflow': sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow')}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"codes": [0, 2], "mlflow": []}


def _start(cfg, tmp_path, name: str):
    from metadist.tracking import Tracker

    tracker = Tracker(cfg)
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("{}\n")
    return tracker, run_dir


def test_a_dataset_another_run_inserted_meanwhile_is_linked(sine_debug, tmp_path, mlflow_store):
    # Two trials of a sweep log the same dataset at once: the store looks it up, the other trial inserts
    # it, and this insert fails on the unique key. The run still gets its input, and the store one row.
    cfg = sine_debug()
    datasets = [{"name": "sinusoid", "split": "train", "digest": "abc123", "source": "metadist:sinusoid",
                 "source_type": "code", "profile": "{}"}]
    other, other_dir = _start(cfg, tmp_path, "other")
    tracker, run_dir = _start(cfg, tmp_path, "run")
    real = tracker.client.log_inputs
    calls = []

    def racing(run_id, **kw):
        calls.append(run_id)
        if len(calls) == 1:  # the other trial inserts between this one's lookup and insert
            other.start(other_dir, {}, datasets)
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                                  "datasets.name, datasets.digest")
        return real(run_id, **kw)

    tracker.client.log_inputs = racing
    tracker.start(run_dir, {}, datasets)
    client = MlflowClient(mlflow_store)
    for run_id in (tracker.run_id, other.run_id):
        (linked,) = client.get_run(run_id).inputs.dataset_inputs
        assert linked.dataset.digest == "abc123" and linked.tags[0].value == "train"
    assert len(calls) == 2

    def broken(run_id, **kw):
        raise MlflowException("the store is gone")

    third, third_dir = _start(cfg, tmp_path, "third")
    third.client.log_inputs = broken
    with pytest.raises(MlflowException, match="the store is gone"):
        third.start(third_dir, {}, datasets)
