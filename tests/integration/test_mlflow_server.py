"""The shared MLflow server of infra/mlflow, for real: its entrypoint starts `mlflow server` with basic
auth on 127.0.0.1, a SQLite file and a local folder standing in for PostgreSQL and MinIO. A metadist
job records to it with credentials; without them the server refuses and metadist says so in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from ..conftest import ROOT, free_port

INFRA = ROOT / "infra/mlflow"
PASSWORD = "test-only-" + os.urandom(6).hex()  # made up per run: no credential lives in the repo


def _status(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        import base64
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture
def server(tmp_path):
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{tmp_path / 'auth.db'}",
           "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
           "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD, "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex(),
           "MLFLOW_PORT": str(port),
           # One server process instead of four: each imports MLflow, which costs seconds on 2 cores.
           "MLFLOW_WORKERS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(tmp_path / "server.log", "w")
    # Its own process group: `mlflow server` starts job consumers that outlive a signal to it alone.
    proc = subprocess.Popen(["sh", str(INFRA / "entrypoint.sh")], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if _status(f"{url}/health") == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        else:
            pytest.fail("the MLflow server did not answer /health within 120 s")
        yield url, tmp_path
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        left = []
        for _ in range(20):  # whatever of the group is left (job consumers) gets SIGKILL and a moment to go
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            time.sleep(0.5)
            left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
            if not left:
                break
        assert not left, f"processes of the MLflow server still running: {left}"


@pytest.mark.slow
def test_basic_auth_server_refuses_strangers_and_records_a_job(server, monkeypatch):
    url, tmp_path = server
    api = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _status(api) == 401
    assert _status(api, ("admin", "wrong")) == 401
    assert _status(api, ("admin", PASSWORD)) == 200

    # Without credentials: one line, before a run folder exists (in-process: the CLI's handling of every
    # user error is tested in tests/unit/test_cli.py; this is the real server's refusal).
    from typer.testing import CliRunner

    from metadist.cli import app

    args = ["train", str(ROOT / "jobs/sine/maml-debug.yaml"), "--no-progress", "--set", "train.steps=30",
            "--set", "eval.episodes=20", "--set", f"train.out_dir={tmp_path / 'runs'}"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "refused the request (401)" in refused.output, refused.output
    assert "Traceback" not in refused.output and not (tmp_path / "runs").exists()

    # With them, as a user runs it: the command in its own process.
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": "admin",
           "MLFLOW_TRACKING_PASSWORD": PASSWORD}
    job = [sys.executable, "-m", "metadist.cli", *args]
    res = subprocess.run(job, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    client = MlflowClient(url)
    (run,) = client.search_runs([client.get_experiment_by_name("maml-debug").experiment_id])
    assert run.info.status == "FINISHED" and "test/metric" in run.data.metrics
    # Artifacts went through the server to its artifact store (MinIO in the compose file).
    stored = {p.name for p in (tmp_path / "artifacts").rglob("*") if p.is_file()}
    assert {"model.pt", "eval.json", "training_curve.png"} <= stored


def test_compose_file_needs_every_secret_and_holds_none():
    compose = yaml.safe_load((INFRA / "docker-compose.yaml").read_text())
    assert {"postgres", "minio", "create-bucket", "mlflow"} <= set(compose["services"])
    mlflow = compose["services"]["mlflow"]
    assert mlflow["ports"] == ["${MLFLOW_PUBLISH_HOST:-127.0.0.1}:5000:5000"]  # loopback unless asked
    text = (INFRA / "docker-compose.yaml").read_text()
    for secret in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_SECRET_KEY"):
        assert f"${{{secret}:?" in text, f"{secret} must be required, never defaulted"
    example = dict(line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert all(not v for k, v in example.items() if "PASSWORD" in k or "SECRET" in k)
    assert "mlflow[auth]==3.17.2" in (INFRA / "Dockerfile").read_text()
