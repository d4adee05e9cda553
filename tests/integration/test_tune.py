"""`metadist tune` end to end: the debug sweep on a local Ray with 2 CPUs, run as a user would run it
(the CLI in its own process, which starts and stops its own Ray)."""

from __future__ import annotations

import json
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


COLLECTIVE = "jobs/sweeps/sine-collective-debug.yaml"


@pytest.mark.slow
def test_collective_sweep_stops_the_worse_trial_and_records_a_diverged_one(tmp_path, mlflow_store):
    out = tmp_path / "sweeps"
    # Three trials of 2 ranks each, one at a time on 2 CPUs (0.1 + 2 x 0.9), in grid order. Their
    # validations reach Tune from rank 0 through Ray Train: ASHA records the first trial (inner lr 1e-5)
    # at its rung (20 steps), then stops the second (inner lr 0.05, val MSE about 6.3 at step 20 against
    # 3.8) at its first report. The third (inner lr 1000) diverges at its first step: its group ends at
    # once, with no restart.
    res = _tune([COLLECTIVE, "--set", "samples=1", "--set", "space.inner.lr={grid: [0.00001, 0.05, 1000.0]}",
                 "--set", "space.inner.steps={choice: [1]}", "--set", "space.algorithm.name={choice: [maml]}",
                 "--set", "train.steps=40", "--set", "report_every=20", "--set", "scheduler.grace_period=20",
                 "--set", "eval.episodes=20", "--set", "eval.val_episodes=20", "--set", f"out_dir={out}"])
    assert res.returncode == 0, res.stderr[-4000:]
    assert "Traceback" not in res.stderr
    folder = _sweep_dir(out)

    table = pq.read_table(folder / "results.parquet").to_pandas().set_index("inner.lr")
    assert table.loc[0.00001, "outcome"] == "finished" and table.loc[0.00001, "steps"] == 40
    assert table.loc[0.05, "outcome"] == "stopped" and table.loc[0.05, "steps"] == 20
    assert table.loc[1000.0, "outcome"] == "diverged"
    # The finished trial's reports: a validation from rank 0 (with the checkpoint Ray Train holds), then
    # the final evaluation from the trial itself.
    (results,) = [p for p in folder.glob("run_trial_*/result.json") if "inner_lr=0.0000" in p.parent.name]
    reports = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["steps_done"], r["outcome"]) for r in reports] == [(20, "running"), (40, "finished")]
    assert reports[0].get("checkpoint_path") and reports[1]["eval_mse"] > 0
    (trial,) = [p for p in folder.glob("trials/*") if (p / "summary.json").exists()]
    digests = json.loads((trial / "summary.json").read_text())["runtime"]["param_digests"]
    assert len(digests) == 2 and len(set(digests)) == 1  # the ranks ended with bitwise the same parameters
    (diverged,) = [p for p in folder.glob("trials/*") if (p / "error.json").exists()]
    assert len((diverged / "group_starts").read_text().splitlines()) == 1  # no restart

    client = MlflowClient(mlflow_store)
    (parent,) = client.search_runs([client.get_experiment_by_name("sine-collective-debug").experiment_id],
                                   filter_string="tags.`metadist.kind` = 'sweep'")
    assert parent.info.status == "FINISHED"
    metrics = parent.data.metrics
    assert (metrics["trials_finished"], metrics["trials_stopped"], metrics["trials_diverged"]) == (1, 1, 1)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.parquet", "best.yaml", "sweep.yaml", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/learning_curves.png", "plots/val_mse_vs_inner.lr.png"}
    children = {c.data.params["inner.lr"]: c for c in _children(client, parent)}
    done, stopped, bad = children["1e-05"], children["0.05"], children["1000.0"]
    assert done.info.status == "FINISHED" and "test/metric" in done.data.metrics
    assert done.data.params["runtime.executor"] == "collective" and done.data.tags["system.workers"] == "2"
    assert len(client.get_metric_history(done.info.run_id, "val/mse")) == 2  # steps 20, 40
    assert stopped.info.status == "KILLED" and "error" not in stopped.data.tags
    assert stopped.data.tags["metadist.status"] == "stopped"
    assert bad.info.status == "FAILED" and "not finite" in bad.data.tags["error"]

    # The best job is ready to run: it loads, and it is the finished trial's config.
    best = load_config(folder / "best.yaml")
    assert best.inner.lr == pytest.approx(0.00001) and best.runtime.executor == "collective"
    assert best.tracking.uri is None


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path, mlflow_store):
    out = tmp_path / "sweeps"
    # 2 samples x 2 safe inner lrs = 4 trials, every one run to the end, two at a time. What is tested is
    # the sweep's resume, so each trial trains in its own process (executor local, one CPU). Ctrl-C can
    # fall between a trial's MLflow run finishing and Tune recording its final report (seen under load);
    # the trial writes that report to its folder first, and the resumed trial reports it again instead
    # of training again, so its MLflow run stays untouched.
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
    for child in current:  # each trial validated every report_every steps
        assert len(client.get_metric_history(child.info.run_id, "val/mse")) == 3


def test_bad_sweep_is_one_line(tmp_path):
    res = _tune([SWEEP, "--set", "space.inner.steps={choice: [0, 1]}"])
    assert res.returncode == 2 and "space.inner.steps: value 0 is not a valid inner.steps" in res.stderr
    assert "Traceback" not in res.stderr
    res = _tune(["--resume", str(tmp_path)])
    assert res.returncode == 2 and "not a sweep folder" in res.stderr
