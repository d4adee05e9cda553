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
alive() { for p in "$@"; do kill -0 "$p" 2>/dev/null && echo "$p"; done; true; }
# In the order `ray stop` uses: the raylet (and the workers it spawned) first, GCS last. Signalled all
# at once, the raylet and GCS wait on each other and outlive a 10 s grace period; in order, each group
# ends within a second or two.
stop() {  # TERM a group, up to 5 s for it to go, then KILL what is left
  [[ $# -eq 0 ]] && return
  kill -TERM "$@" 2>/dev/null || true
  for _ in $(seq 1 25); do
    [[ -z "$(alive "$@")" ]] && return
    sleep 0.2
  done
  # shellcheck disable=SC2046
  kill -KILL $(alive "$@") 2>/dev/null || true
}
RAYLET=""; GCS=""; OTHERS=""
for pid in $PIDS; do
  case "$(ps -o comm= -p "$pid" 2>/dev/null)" in
    raylet) RAYLET="$RAYLET $(tree "$pid")" ;;
    gcs_server) GCS="$GCS $pid" ;;
    *) OTHERS="$OTHERS $pid" ;;
  esac
done
# shellcheck disable=SC2086
stop $RAYLET
# shellcheck disable=SC2086
stop $(for p in $OTHERS; do case " $RAYLET " in *" $p "*) ;; *) echo "$p" ;; esac; done)
# shellcheck disable=SC2086
stop $GCS
rm -f "$STATE/head.env" "$STATE/pids"
echo "head stopped"
