"""`metadist tune` end to end: the debug sweep on a local Ray with 2 CPUs, run as a user would run it
(the CLI in its own process, which starts and stops its own Ray)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from metadist.config import load_config

from ..conftest import ROOT

# Their own Ray (a `metadist tune`, a head): in a pytest-xdist worker of their own, beside the in-process
# Ray tests, which mostly compute while these mostly wait on processes starting and polling.
pytestmark = [pytest.mark.usefixtures("no_local_ray"), pytest.mark.xdist_group("ray-cli")]

SWEEP = "jobs/sweeps/sine-debug.yaml"
# The debug sweep, shorter still: what is tested is the sweep machinery, not how well trials learn.
SHORT = ["--set", "train.steps=100", "--set", "report_every=25", "--set", "eval.episodes=20",
         "--set", "eval.val_episodes=20"]


def _tune(args: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metadist.cli", "tune", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "COLUMNS": "120"})


def _sweep_dir(out: Path) -> Path:
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return folder


def _children(client: MlflowClient, parent):
    return client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")


@pytest.mark.slow
def test_debug_sweep_with_a_diverging_trial(tmp_path, mlflow_store):
    out = tmp_path / "sweeps"
    # A 2-value grid, two trials at once; inner lr 1000 diverges at the first step. Short trials (100
    # steps, a report every 25, ASHA's first rung at 50) keep the sweep's every path in a minute. (ASHA
    # stopping a trial is tested with collective trials, in test_submit.py, where its order is fixed.)
    res = _tune([SWEEP, "--set", "samples=1", "--set", "space.inner.lr={grid: [0.003, 1000.0]}",
                 "--set", f"out_dir={out}", *SHORT, "--set", "scheduler.grace_period=50"])
    assert res.returncode == 0, res.stderr[-4000:]
    assert "Traceback" not in res.stderr
    folder = _sweep_dir(out)

    table = pq.read_table(folder / "results.parquet").to_pandas()
    assert len(table) == 2 and table["trial"].is_unique
    diverged = table[table["outcome"] == "diverged"]
    assert len(diverged) == 1 and (diverged["inner.lr"] == 1000.0).all()
    sane = table[table["inner.lr"] < 1]
    assert set(sane["outcome"]) <= {"finished", "stopped"} and (sane["outcome"] == "finished").any()
    assert (sane["val_mse"] < 10).all()
    finished = table[table["outcome"] == "finished"]
    assert (finished["steps"] == 100).all() and finished["eval_mse"].notna().all()

    client = MlflowClient(mlflow_store)
    (parent,) = client.search_runs([client.get_experiment_by_name("sine-debug").experiment_id],
                                   filter_string="tags.`metadist.kind` = 'sweep'")
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_diverged"] == 1 and parent.data.metrics["best_val_mse"] < 10
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.parquet", "best.yaml", "sweep.yaml", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/learning_curves.png", "plots/val_mse_vs_inner.lr.png"}

    children = _children(client, parent)
    assert len(children) == 2
    by_trial = {c.data.tags["metadist.trial_id"]: c for c in children}
    assert set(by_trial) == set(table["trial"])
    for row in table.to_dict("records"):
        child = by_trial[row["trial"]]
        assert child.data.tags["metadist.status"] == row["outcome"]
        assert float(child.data.params["inner.lr"]) == pytest.approx(row["inner.lr"])
        if row["outcome"] == "diverged":
            assert child.info.status == "FAILED" and "not finite" in child.data.tags["error"]
        else:
            history = client.get_metric_history(child.info.run_id, "val/mse")
            assert len(history) == row["steps"] // 25  # one validation every report_every = 25 steps
        if row["outcome"] == "finished":
            assert child.info.status == "FINISHED" and "test/metric" in child.data.metrics
        if row["outcome"] == "stopped":
            assert child.info.status == "KILLED" and "error" not in child.data.tags

    # The best job is ready to run: it loads, and it is the best finished trial's config.
    best = load_config(folder / "best.yaml")
    top = finished.sort_values("val_mse").iloc[0]
    assert best.inner.lr == pytest.approx(top["inner.lr"]) and best.inner.steps == top["inner.steps"]
    assert best.runtime.executor == "ray" and best.tracking.uri is None


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path, mlflow_store):
    out = tmp_path / "sweeps"
    # 2 samples x 2 safe inner lrs = 4 trials, every one run to the end, two at a time. What is tested is
    # the sweep's resume, so each trial trains in its own process (executor local, one CPU): the trials'
    # worker actors are tested above.
    args = [SWEEP, "--set", "samples=2", "--set", "space.inner.lr={grid: [0.001, 0.003]}", "--set",
            "scheduler.name=none", *SHORT, "--set", "train.steps=60", "--set", "report_every=20",
            "--set", "runtime.executor=local", "--set", "trial_cpus=1", "--set", f"out_dir={out}"]
    proc = subprocess.Popen([sys.executable, "-m", "metadist.cli", "tune", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    client = MlflowClient(mlflow_store)
    try:
        deadline = time.time() + 240
        finished_before: dict[str, tuple[str, int]] = {}
        while time.time() < deadline and len(finished_before) < 2:
            time.sleep(0.5)
            exp = client.get_experiment_by_name("sine-debug")
            if exp is None:
                continue
            for run in client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'"):
                if "metadist.trial_id" in run.data.tags:
                    finished_before[run.data.tags["metadist.trial_id"]] = (run.info.run_id, run.info.end_time)
        assert len(finished_before) >= 2, "no trial finished in time"
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, output[-3000:]
    folder = _sweep_dir(out)
    assert f"metadist tune --resume {folder}" in output

    res = _tune(["--resume", str(folder)])
    assert res.returncode == 0, res.stderr[-4000:]
    table = pq.read_table(folder / "results.parquet").to_pandas()
    assert len(table) == 4 and set(table["outcome"]) == {"finished"}

    (parent,) = client.search_runs([client.get_experiment_by_name("sine-debug").experiment_id],
                                   filter_string="tags.`metadist.kind` = 'sweep'")
    assert parent.info.status == "FINISHED"
    current = [c for c in _children(client, parent) if c.data.tags["metadist.status"] != "superseded"]
    assert sorted(c.data.tags["metadist.trial_id"] for c in current) == sorted(table["trial"])
    for trial, (run_id, end_time) in finished_before.items():
        run = client.get_run(run_id)
        # The same child run, untouched by the resumed sweep: the trial was not run again.
        assert run.info.end_time == end_time and run.data.tags["metadist.status"] == "finished"
        assert table.set_index("trial").loc[trial, "mlflow_run_id"] == run_id


def test_bad_sweep_is_one_line(tmp_path):
    res = _tune([SWEEP, "--set", "space.inner.steps={choice: [0, 1]}"])
    assert res.returncode == 2 and "space.inner.steps: value 0 is not a valid inner.steps" in res.stderr
    assert "Traceback" not in res.stderr
    res = _tune(["--resume", str(tmp_path)])
    assert res.returncode == 2 and "not a sweep folder" in res.stderr
