#!/usr/bin/env bash
# Stop the head started by cluster/start-head.sh, and only it: the processes it recorded and their
# descendants (workers, agents). `ray stop` would stop every Ray on the machine.
set -euo pipefail

STATE="${METADIST_HEAD_DIR:-/tmp/metadist-head}"
if [[ ! -f "$STATE/head.env" ]]; then
  echo "no head recorded in $STATE; nothing to stop" >&2
  exit 0
fi

tree() {  # a pid and all its descendants
  local pid=$1
  echo "$pid"
  for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do tree "$child"; done
}
PIDS=""
for pid in $(cat "$STATE/pids"); do
  kill -0 "$pid" 2>/dev/null && PIDS="$PIDS $(tree "$pid")"
done
alive() { for p in $PIDS; do kill -0 "$p" 2>/dev/null && echo "$p"; done; true; }
if [[ -n "${PIDS// /}" ]]; then
  kill -TERM $PIDS 2>/dev/null || true
  for _ in $(seq 1 50); do
    [[ -z "$(alive)" ]] && break
    sleep 0.2
  done
  LEFT="$(alive)"
  if [[ -n "$LEFT" ]]; then kill -KILL $LEFT 2>/dev/null || true; fi
fi
rm -f "$STATE/head.env" "$STATE/pids"
echo "head stopped"
