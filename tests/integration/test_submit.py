"""`metadist submit` against a real Ray head started by cluster/start-head.sh (token auth on)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.slow
def test_submit_runs_a_collective_job_on_a_real_head(head, tmp_path, mlflow_store, cluster_store):
    # The README's collective line: Ray Train ranks on the head, all-reducing among themselves; the store
    # is the one given with --tracking-uri, over the head's own. (A sweep of collective trials, and what
    # Tune does with them, is tested in test_tune.py.)
    res = subprocess.run(
        [sys.executable, "-m", "metadist.cli", "submit", "jobs/sine/maml-debug.yaml", "--address", head,
         "--set", "runtime.executor=collective", "--set", "runtime.workers=2", "--set", "train.steps=40",
         "--set", "eval.episodes=20", "--set", f"train.out_dir={tmp_path}", "--tracking-uri", mlflow_store],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    assert "metadist.cli train jobs/sine/maml-debug.yaml" in res.stderr and "SUCCEEDED" in res.stderr
    (folder,) = tmp_path.glob("maml-debug-*")
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["runtime"]["executor"] == "collective" and summary["metrics"]["step"] == 39
    digests = summary["runtime"]["param_digests"]
    assert len(digests) == 2 and len(set(digests)) == 1  # the ranks ended with bitwise the same parameters
    assert MlflowClient(cluster_store).get_experiment_by_name("maml-debug") is None
    client = MlflowClient(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("maml-debug").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["executor"] == "collective"
    assert run.data.tags["metadist.run_dir"] == str(folder)


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
