"""`metadist submit`: run a job on a Ray cluster through Ray's job server (the Jobs API).

The job's entrypoint is `python -m metadist.cli train JOB --no-progress [--set ...]` (for a sweep file,
`python -m metadist.cli tune SWEEP [--set ...]`), run in an uploaded copy of the working directory. Inside the job, `runtime.executor: ray` joins the cluster the job runs
on.

MLflow: a cluster that sets its own MLFLOW_TRACKING_URI on its nodes (a KubeRay pod's ConfigMap, the
local head of cluster/start-head.sh) keeps it: the submitter's store may be a laptop's port-forward or
SQLite file the cluster cannot reach. A cluster without one records to the submitter's store, passed
as METADIST_SUBMITTER_TRACKING_URI, so the run shows up where the user looks. `--tracking-uri`
overrides both. Credentials never travel with the job: the cluster's nodes hold their own. The run
folder is the job's `train.out_dir`, else the cluster's METADIST_OUT_DIR (`metadist.store_uri`): never
Ray's copy of the uploaded folder, in which the job runs.

Token authentication (on by default for Ray's local clusters): where a token is available
(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) and RAY_AUTH_MODE is unset, token mode is
switched on for this client, the way `ray job submit` needs `RAY_AUTH_MODE=token`.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

from rich.console import Console

from metadist.errors import UserError
from metadist.net import unreachable
from metadist.store_uri import SUBMITTER_URI, tracking_uri

EXCLUDES = [".venv", ".git", "runs", "mlruns", "mlflow.db", "*.pt", "__pycache__", ".pytest_cache", "bench"]
EXIT = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}
AGENT_WAIT_S = 60.0


class SubmitError(UserError, RuntimeError):
    """The job server cannot be reached or refused the job."""


def _enable_token_auth() -> None:
    if os.environ.get("RAY_AUTH_MODE"):
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or \
            (Path.home() / ".ray" / "auth_token").is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def _check_reachable(address: str) -> None:
    try:
        silent = unreachable(address, default_port=8265)  # the dashboard's port, as `ray job submit` uses
    except ValueError:
        raise SubmitError(f"--address {address}: expected the dashboard's http://host:port") from None
    if silent:
        raise SubmitError(f"--address {address}: {silent}; start a head with cluster/start-head.sh, or pass "
                          f"the dashboard address of your cluster")


def entrypoint(job: Path, overrides: list[str], working_dir: Path, sweep: bool = False) -> str:
    """The shell command the cluster runs, with the job path relative to the uploaded directory;
    `sweep`: the file is a sweep file (the caller read it), run by `metadist tune`."""
    try:
        rel = Path(job).resolve().relative_to(Path(working_dir).resolve())
    except ValueError:
        raise SubmitError(f"{job} is not inside --working-dir {working_dir}: the cluster would not have it") from None
    if sweep:  # a sweep's driver runs Tune on the cluster; its trials are the cluster's
        args = ["python", "-m", "metadist.cli", "tune", rel.as_posix()]
    else:
        args = ["python", "-m", "metadist.cli", "train", rel.as_posix(), "--no-progress"]
    for o in overrides:
        args += ["--set", o]
    return " ".join(shlex.quote(a) for a in args)


def job_env(forced_tracking_uri: str | None = None) -> dict[str, str]:
    """The environment variables the job gets: which MLflow store it records to (see the module doc)."""
    if forced_tracking_uri:
        return {"MLFLOW_TRACKING_URI": forced_tracking_uri}
    return {SUBMITTER_URI: tracking_uri()}


def submit_job(job: Path, address: str, overrides: list[str], *, wait: bool = True,
               working_dir: Path = Path("."), console: Console | None = None,
               forced_tracking_uri: str | None = None, sweep: bool = False) -> int:
    """Submit, optionally stream logs until the job ends; return the exit code for its status."""
    console = console or Console(stderr=True)
    _check_reachable(address)
    _enable_token_auth()
    from ray.job_submission import JobStatus, JobSubmissionClient

    cmd = entrypoint(job, overrides, working_dir, sweep)
    env = job_env(forced_tracking_uri)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            client = JobSubmissionClient(address)
            job_id = client.submit_job(entrypoint=cmd, runtime_env={
                "working_dir": str(working_dir), "excludes": EXCLUDES, "env_vars": env})
            break
        except Exception as err:  # the client raises RuntimeError/ConnectionError with the server's reply
            # A head that has just started answers before its job agent is up: that one is worth a wait.
            # Matched by text: ray 2.60.0's job server answers 500 with this text (as for any failure),
            # and the client raises a plain RuntimeError; there is no type or status that tells it apart.
            if "No available agent" in str(err) and time.monotonic() < deadline:
                time.sleep(2)
                continue
            raise SubmitError(f"the job server at {address} refused the job: "
                              f"{str(err).splitlines()[0][:300]}") from None
    console.print(f"submitted {job_id} to {address}: {cmd}")
    where = forced_tracking_uri or f"the cluster's MLFLOW_TRACKING_URI if its nodes set one, else {env[SUBMITTER_URI]}"
    console.print(f"MLflow: {where}", soft_wrap=True, highlight=False)  # a URI is copied whole, not wrapped
    if not wait:
        return 0

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(tail())
    status = client.get_job_status(job_id)
    while not JobStatus(status).is_terminal():  # the log stream can end a moment before the status
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    console.print(f"job {job_id}: {status}")
    return EXIT.get(str(status.value if hasattr(status, "value") else status), 1)
