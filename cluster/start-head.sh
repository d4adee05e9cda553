#!/usr/bin/env bash
# Start a local Ray head for `metadist submit`: GCS on 127.0.0.1:${RAY_PORT:-6379}, dashboard and job
# server on 127.0.0.1:${RAY_DASHBOARD_PORT:-8265}. Token authentication stays on (Ray's default for
# local clusters): the token lands in ~/.ray/auth_token, where `metadist submit` and `ray job submit`
# with RAY_AUTH_MODE=token find it. The job agent listens on ${RAY_DASHBOARD_AGENT_PORT:-52365}: a
# second Ray on the machine (a local `metadist tune` has one) needs a port of its own there, or the head
# answers "No available agent to submit job".
#
# The head's own processes are recorded in $METADIST_HEAD_DIR/pids, so that cluster/stop-head.sh
# stops exactly them (and what they spawned), never another Ray on the machine: they are the processes
# whose command line names this head's temp dir (GCS, raylet, dashboard, monitors; the agents and
# workers are their descendants). A list of Ray processes taken before and after `ray start` would also
# catch another Ray that started at the same moment.
set -euo pipefail

STATE="${METADIST_HEAD_DIR:-/tmp/metadist-head}"
if [[ -f "$STATE/head.env" ]]; then
  echo "a head started by this script is already recorded in $STATE (cluster/stop-head.sh stops it)" >&2
  exit 1
fi
mkdir -p "$STATE"
RAY="${RAY:-$(command -v ray || echo "$(dirname "$0")/../.venv/bin/ray")}"
# Jobs on this head run `python -m metadist.cli`: the Python that has this Ray (and metadist's deps).
export PATH="$(cd "$(dirname "$RAY")" && pwd):$PATH"
# Where the jobs on this head write when they name no place of their own: a job runs in Ray's temporary
# copy of its working directory, which Ray deletes, so ./runs and ./mlflow.db there would be lost. The
# head's processes, and so its jobs, inherit these; by default the folder this script runs from, as
# `metadist train` run here would use.
METADIST_OUT_DIR="$(realpath -m "${METADIST_OUT_DIR:-$PWD/runs}")"
export METADIST_OUT_DIR
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$PWD/mlflow.db}"
# A collective group with a hung rank is restarted after this wait for its process group's shutdown,
# not Ray Train's default 30 s (read by Ray Train's controller, which runs on the job's node: here).
export TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S="${TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S:-10}"
# Ray Train's placement-group cleaner asks this head's state API whether a run's controller still lives.
# Left to find it, it finds no single Ray when another runs on the machine (a local `metadist tune`), and
# then never removes a dead controller's group: a stopped sweep trial would keep its CPUs.
export RAY_API_SERVER_ADDRESS="http://127.0.0.1:${RAY_DASHBOARD_PORT:-8265}"

"$RAY" start --head \
  --node-ip-address=127.0.0.1 --port="${RAY_PORT:-6379}" \
  --dashboard-host=127.0.0.1 --dashboard-port="${RAY_DASHBOARD_PORT:-8265}" \
  --dashboard-agent-listen-port="${RAY_DASHBOARD_AGENT_PORT:-52365}" \
  --num-cpus="${RAY_NUM_CPUS:-2}" --object-store-memory="${RAY_OBJECT_STORE_BYTES:-500000000}" \
  --temp-dir="$STATE/ray" --disable-usage-stats

pgrep -f "$STATE/ray/" > "$STATE/pids" || true
cat > "$STATE/head.env" <<ENV
RAY_ADDRESS=127.0.0.1:${RAY_PORT:-6379}
DASHBOARD=http://127.0.0.1:${RAY_DASHBOARD_PORT:-8265}
TEMP_DIR=$STATE/ray
METADIST_OUT_DIR=$METADIST_OUT_DIR
MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI
ENV
echo "head up: submit with  metadist submit JOB.yaml --address http://127.0.0.1:${RAY_DASHBOARD_PORT:-8265}"
echo "jobs that name no output folder or MLflow store write runs under $METADIST_OUT_DIR and record to $MLFLOW_TRACKING_URI"
