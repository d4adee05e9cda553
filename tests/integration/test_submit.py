"""`metadist submit` against a real Ray head started by cluster/start-head.sh (token auth on)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from ..conftest import ROOT, free_port, new_store

# Their own Ray (a `metadist tune`, a head): in a pytest-xdist worker of their own, beside the in-process
# Ray tests, which mostly compute while these mostly wait on processes starting and polling.
pytestmark = [pytest.mark.usefixtures("no_local_ray"), pytest.mark.xdist_group("ray-cli")]


@pytest.fixture(scope="module")
def cluster_store(tmp_path_factory, empty_store):
    """The MLflow store the head's own environment names, as a KubeRay ConfigMap would."""
    return new_store(tmp_path_factory, empty_store, "cluster")


@pytest.fixture(scope="module")
def head_runs(tmp_path_factory):
    """The output folder the head's own environment names (cluster/start-head.sh's METADIST_OUT_DIR)."""
    return tmp_path_factory.mktemp("head-runs")


# The head's state folder, Ray's temp dir under it. Short: Ray's unix socket paths must stay under ~107
# characters.
STATE = f"/tmp/md-head-{os.getpid()}"


@pytest.fixture(scope="module")
def head(cluster_store, head_runs, request):
    state, failed = STATE, request.session.testsfailed
    # Free ports: another checkout's test head on this machine must not meet this one.
    gcs, dashboard, agent = free_port(), free_port(), free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": cluster_store, "METADIST_OUT_DIR": str(head_runs),
           "METADIST_HEAD_DIR": state, "RAY_PORT": str(gcs), "RAY_DASHBOARD_PORT": str(dashboard),
           "RAY_DASHBOARD_AGENT_PORT": str(agent),
           "RAY": str(ROOT / ".venv/bin/ray") if (ROOT / ".venv/bin/ray").exists() else "ray",
           "RAY_NUM_CPUS": "2", "RAY_OBJECT_STORE_BYTES": str(200 * 1024 * 1024)}
    start = subprocess.run(["bash", str(ROOT / "cluster/start-head.sh")], env=env, capture_output=True, text=True)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        stop = subprocess.run(["bash", str(ROOT / "cluster/stop-head.sh")], env=env, capture_output=True, text=True)
        assert stop.returncode == 0, stop.stderr
        leftover = subprocess.run(["pgrep", "-f", f"{state}/"], capture_output=True, text=True).stdout.split()
        assert not leftover, f"processes of the head still running: {leftover}"
        if request.session.testsfailed == failed:  # Ray's logs and session files, kept if a test failed
            shutil.rmtree(state)


@pytest.mark.slow
def test_a_job_that_fails_on_the_head_fails_submit(head):
    # A relative output folder would be in Ray's temporary copy of the job's working directory: the job
    # stops at once with one line, and `metadist submit` fails with it.
    res = subprocess.run(
        [sys.executable, "-m", "metadist.cli", "submit", "jobs/sine/maml-debug.yaml", "--address", head,
         "--set", "train.out_dir=runs/mine"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "FAILED" in res.stderr, res.stderr[-2000:]
    assert "error: train.out_dir=runs/mine: it would be in Ray's temporary copy of this job's working " \
           "directory" in res.stdout and "Traceback" not in res.stdout


SWEEP = "jobs/sweeps/sine-collective-debug.yaml"


@pytest.mark.slow
def test_submit_runs_a_collective_sweep_on_a_real_head(head, tmp_path, mlflow_store, cluster_store):
    out = tmp_path / "sweeps"
    # Two trials of 2 ranks each, one at a time on the head's 2 CPUs (0.1 + 2 x 0.9). Their validations
    # reach Tune from rank 0 through Ray Train: ASHA records the first trial (inner lr 1e-5) at its rungs
    # (20 and 40 steps), then stops the second (inner lr 0.05, val MSE about 6.3 at step 20 against 3.8)
    # at its first report. The rest of the sweep machinery is tested in test_tune.py. The store is the
    # one given with --tracking-uri, over the head's own.
    res = subprocess.run(
        [sys.executable, "-m", "metadist.cli", "submit", SWEEP, "--address", head,
         "--set", "samples=1", "--set", "space.inner.lr={grid: [0.00001, 0.05]}",
         "--set", "space.inner.steps={choice: [1]}", "--set", "space.algorithm.name={choice: [maml]}",
         "--set", "train.steps=60", "--set", "report_every=20", "--set", "scheduler.grace_period=20",
         "--set", "eval.episodes=20", "--set", "eval.val_episodes=20", "--set", f"out_dir={out}",
         "--tracking-uri", mlflow_store],
        cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    assert f"metadist.cli tune {SWEEP}" in res.stderr and "SUCCEEDED" in res.stderr
    assert f"MLflow: {mlflow_store}" in res.stderr
    (folder,) = out.iterdir()
    table = pq.read_table(folder / "results.parquet").to_pandas().set_index("inner.lr")
    assert table.loc[0.00001, "outcome"] == "finished" and table.loc[0.00001, "steps"] == 60
    assert table.loc[0.05, "outcome"] == "stopped" and table.loc[0.05, "steps"] == 20
    # The finished trial's reports: two validations from rank 0 (with the checkpoint Ray Train holds),
    # then the final evaluation from the trial itself.
    (results,) = [p for p in folder.glob("run_trial_*/result.json") if "inner_lr=0.0000" in p.parent.name]
    reports = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["steps_done"], r["outcome"]) for r in reports] == [(20, "running"), (40, "running"),
                                                                   (60, "finished")]
    assert all(r.get("checkpoint_path") for r in reports[:2]) and reports[2]["eval_mse"] > 0
    (trial,) = [p for p in folder.glob("trials/*") if (p / "summary.json").exists()]
    digests = json.loads((trial / "summary.json").read_text())["runtime"]["param_digests"]
    assert len(digests) == 2 and len(set(digests)) == 1  # the ranks ended with bitwise the same parameters
    assert MlflowClient(cluster_store).get_experiment_by_name("sine-collective-debug") is None
    client = MlflowClient(mlflow_store)
    exp = client.get_experiment_by_name("sine-collective-debug").experiment_id
    (parent,) = client.search_runs([exp], filter_string="tags.`metadist.kind` = 'sweep'")
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_finished"] == 1 and parent.data.metrics["trials_stopped"] == 1
    children = {c.data.params["inner.lr"]: c for c in client.search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    done, stopped = children["1e-05"], children["0.05"]
    assert done.info.status == "FINISHED" and "test/metric" in done.data.metrics
    assert done.data.params["runtime.executor"] == "collective" and done.data.tags["system.workers"] == "2"
    assert len(client.get_metric_history(done.info.run_id, "val/mse")) == 3  # steps 20, 40, 60
    assert stopped.info.status == "KILLED"


def _readme_ray_job_submit(address: str) -> str:
    """The README's "the same with Ray's own CLI" command, aimed at `address`."""
    lines = (ROOT / "README.md").read_text().split("# the same with Ray's own CLI", 1)[1].splitlines()[1:]
    parts = []
    for line in lines:  # up to the first line that does not continue with a backslash
        parts.append(line.strip().rstrip("\\").strip())
        if not line.rstrip().endswith("\\"):
            break
    command = " ".join(parts)
    assert command.startswith("RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 ")
    return command.replace("http://127.0.0.1:8265", address)


@pytest.mark.slow
def test_the_readmes_ray_job_submit_writes_where_the_head_says(head, head_runs, cluster_store):
    # As a new user would: the plain command from the README, run from the repository with the venv on
    # PATH. The job runs in Ray's temporary copy of the working directory; its run folder and its MLflow
    # run must land where the head's environment says, never in that copy.
    env = {**os.environ, "PATH": f"{ROOT / '.venv/bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI")  # the submitter's own store plays no part
    command = _readme_ray_job_submit(head)
    res = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    (folder,) = head_runs.glob("maml-debug-*")
    assert (folder / "checkpoint.pt").is_file() and (folder / "eval.json").is_file()
    client = MlflowClient(cluster_store)
    # The head sets its own MLFLOW_TRACKING_URI: the run is there.
    (run,) = client.search_runs([client.get_experiment_by_name("maml-debug").experiment_id])
    assert run.data.tags["metadist.run_dir"] == str(folder)
    copies = [p for p in Path(STATE).glob("ray/session_*/runtime_resources/working_dir_files/*") if p.is_dir()]
    assert copies and not [p for c in copies for p in c.iterdir() if p.name in ("runs", "mlflow.db", "mlruns")]

    # A cluster that names neither place: the job stops at once with one line that says what to set.
    args = shlex.split(command)
    at = args.index("--runtime-env-json") + 1
    args[at] = json.dumps({**json.loads(args[at]), "env_vars": {"METADIST_OUT_DIR": "", "MLFLOW_TRACKING_URI": ""}})
    res = subprocess.run(["env", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "Traceback" not in res.stdout, res.stdout[-3000:]
    # One line (Ray prints the job's last log lines again with its status: the same line twice).
    (said,) = {line for line in res.stdout.splitlines() if line.startswith("error:")}
    assert said.startswith("error: this Ray job has no MLflow store: ./mlflow.db would be in Ray's temporary "
                           "copy of this job's working directory") and "set MLFLOW_TRACKING_URI" in said


def test_submit_to_nothing_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "metadist.cli", "submit", "jobs/sine/maml-debug.yaml",
                          "--address", "http://127.0.0.1:9"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "nothing answers at 127.0.0.1:9" in res.stderr
    assert "Traceback" not in res.stderr
