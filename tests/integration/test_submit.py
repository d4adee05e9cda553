"""`metadist submit` against a real Ray head started by cluster/start-head.sh (token auth on)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from ..conftest import ROOT, new_store

# Their own Ray (a `metadist tune`, a head): in a pytest-xdist worker of their own, beside the in-process
# Ray tests, which mostly compute while these mostly wait on processes starting and polling.
pytestmark = [pytest.mark.usefixtures("no_local_ray"), pytest.mark.xdist_group("ray-cli")]


@pytest.fixture(scope="module")
def cluster_store(tmp_path_factory, empty_store):
    """The MLflow store the head's own environment names, as a KubeRay ConfigMap would."""
    return new_store(tmp_path_factory, empty_store, "cluster")


@pytest.fixture(scope="module")
def head(cluster_store):
    # Short temp dir: Ray's unix socket paths must stay under ~107 characters.
    state = f"/tmp/md-head-{os.getpid()}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": cluster_store,
           "METADIST_HEAD_DIR": state, "RAY_PORT": "6391", "RAY_DASHBOARD_PORT": "8271",
           "RAY_DASHBOARD_AGENT_PORT": "52391",
           "RAY": str(ROOT / ".venv/bin/ray") if (ROOT / ".venv/bin/ray").exists() else "ray",
           "RAY_NUM_CPUS": "2", "RAY_OBJECT_STORE_BYTES": str(200 * 1024 * 1024)}
    start = subprocess.run(["bash", str(ROOT / "cluster/start-head.sh")], env=env, capture_output=True, text=True)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        yield "http://127.0.0.1:8271"
    finally:
        stop = subprocess.run(["bash", str(ROOT / "cluster/stop-head.sh")], env=env, capture_output=True, text=True)
        assert stop.returncode == 0, stop.stderr
        leftover = subprocess.run(["pgrep", "-f", f"{state}/"], capture_output=True, text=True).stdout.split()
        assert not leftover, f"processes of the head still running: {leftover}"


@pytest.mark.slow
def test_submit_runs_the_debug_job_on_a_real_head(head, tmp_path, mlflow_store):
    out = tmp_path / "runs"
    res = subprocess.run(
        [sys.executable, "-m", "metadist.cli", "submit", "jobs/sine/maml-debug.yaml", "--address", head,
         "--set", "runtime.executor=ray", "--set", "runtime.workers=2", "--set", "runtime.cpus_per_worker=0.5",
         "--set", "train.steps=20", "--set", "eval.episodes=10", "--set", f"train.out_dir={out}",
         "--tracking-uri", mlflow_store],  # over the cluster's own store
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    assert "SUCCEEDED" in res.stderr and f"MLflow: {mlflow_store}" in res.stderr
    client = MlflowClient(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("maml-debug").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["system.workers"] == "2"
    assert "test/metric" in run.data.metrics

    # A job that fails on the cluster (its inner loop diverges) makes submit fail too.
    res = subprocess.run(
        [sys.executable, "-m", "metadist.cli", "submit", "jobs/sine/maml-debug.yaml", "--address", head,
         "--set", "inner.lr=1e6", "--set", "train.steps=5", "--set", f"train.out_dir={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "FAILED" in res.stderr, res.stderr[-2000:]
    assert "meta-gradient is not finite" in res.stdout


@pytest.mark.slow
def test_submit_runs_a_sweep_on_a_real_head(head, tmp_path, mlflow_store, cluster_store):
    out = tmp_path / "sweeps"
    res = subprocess.run(
        [sys.executable, "-m", "metadist.cli", "submit", "jobs/sweeps/sine-debug.yaml", "--address", head,
         "--set", "samples=1", "--set", "space.inner.lr={grid: [0.003]}", "--set", "train.steps=40",
         "--set", "report_every=20", "--set", "eval.episodes=20", "--set", "eval.val_episodes=20",
         "--set", "scheduler.name=none", "--set", f"out_dir={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    assert "metadist.cli tune jobs/sweeps/sine-debug.yaml" in res.stderr and "SUCCEEDED" in res.stderr
    # The head sets its own MLFLOW_TRACKING_URI, so the runs are there and not in the submitter's store.
    assert MlflowClient(mlflow_store).get_experiment_by_name("sine-debug") is None
    client = MlflowClient(cluster_store)
    exp = client.get_experiment_by_name("sine-debug").experiment_id
    (parent,) = client.search_runs([exp], filter_string="tags.`metadist.kind` = 'sweep'")
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_finished"] == 1
    (child,) = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert child.info.status == "FINISHED" and "test/metric" in child.data.metrics


def test_submit_to_nothing_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "metadist.cli", "submit", "jobs/sine/maml-debug.yaml",
                          "--address", "http://127.0.0.1:9"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "nothing answers at 127.0.0.1:9" in res.stderr
    assert "Traceback" not in res.stderr
