#!/usr/bin/env bash
# Start a local Ray head for `metadist submit`: GCS on 127.0.0.1:${RAY_PORT:-6379}, dashboard and job
# server on 127.0.0.1:${RAY_DASHBOARD_PORT:-8265}. Token authentication stays on (Ray's default for
# local clusters): the token lands in ~/.ray/auth_token, where `metadist submit` and `ray job submit`
# with RAY_AUTH_MODE=token find it. The job agent listens on ${RAY_DASHBOARD_AGENT_PORT:-52365}: a
# second Ray on the machine (a local `metadist tune` has one) needs a port of its own there, or the head
# answers "No available agent to submit job".
#
# The processes `ray start` leaves behind are recorded in $METADIST_HEAD_DIR/pids, so that
# cluster/stop-head.sh stops exactly them (and what they spawned), never another Ray on the machine.
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

ray_pids() { pgrep -f "ray[/:]|raylet|gcs_server" | sort -u || true; }
BEFORE="$(ray_pids)"
"$RAY" start --head \
  --node-ip-address=127.0.0.1 --port="${RAY_PORT:-6379}" \
  --dashboard-host=127.0.0.1 --dashboard-port="${RAY_DASHBOARD_PORT:-8265}" \
  --dashboard-agent-listen-port="${RAY_DASHBOARD_AGENT_PORT:-52365}" \
  --num-cpus="${RAY_NUM_CPUS:-2}" --object-store-memory="${RAY_OBJECT_STORE_BYTES:-500000000}" \
  --temp-dir="$STATE/ray" --disable-usage-stats

comm -13 <(echo "$BEFORE") <(ray_pids) > "$STATE/pids"
cat > "$STATE/head.env" <<ENV
RAY_ADDRESS=127.0.0.1:${RAY_PORT:-6379}
DASHBOARD=http://127.0.0.1:${RAY_DASHBOARD_PORT:-8265}
TEMP_DIR=$STATE/ray
ENV
echo "head up: submit with  metadist submit JOB.yaml --address http://127.0.0.1:${RAY_DASHBOARD_PORT:-8265}"
