#!/usr/bin/env bash
# Prefect server + process worker on loopback for medssl's deployments.
#   flows/services.sh up     start both in the background (PID files, logs in $RUN_DIR), create the pool, deploy
#   flows/services.sh down   stop exactly the processes recorded in the PID files
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${RUN_DIR:-$PWD/.run/prefect}
PORT=${PREFECT_PORT:-4200}
POOL=medssl-process
export PREFECT_API_URL=${PREFECT_API_URL:-http://127.0.0.1:$PORT/api}
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 MLFLOW_DISABLE_TELEMETRY=true
export PREFECT_SERVER_DATABASE_CONNECTION_URL=${PREFECT_SERVER_DATABASE_CONNECTION_URL:-sqlite+aiosqlite:///$RUN_DIR/prefect.db}
mkdir -p "$RUN_DIR"

start() {  # name, command...: run in its own session so the whole group can be stopped by PID
  local name=$1; shift
  if [[ -f $RUN_DIR/$name.pid ]] && kill -0 "$(cat "$RUN_DIR/$name.pid")" 2>/dev/null; then
    echo "$name already running (pid $(cat "$RUN_DIR/$name.pid"))"; return
  fi
  setsid "$@" >"$RUN_DIR/$name.log" 2>&1 < /dev/null &
  echo $! >"$RUN_DIR/$name.pid"
  echo "$name started (pid $!, log $RUN_DIR/$name.log)"
}

stop() {  # name, signal: the worker ignores SIGTERM, SIGINT stops it
  local name=$1 sig=$2 pid
  [[ -f $RUN_DIR/$name.pid ]] || return 0
  pid=$(cat "$RUN_DIR/$name.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill "-$sig" -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -KILL -- "-$pid" 2>/dev/null || true
    echo "$name stopped (pid $pid)"
  fi
  rm -f "$RUN_DIR/$name.pid"
}

case ${1:-} in
  up)
    start server prefect server start --host 127.0.0.1 --port "$PORT"
    for _ in $(seq 1 120); do
      curl -sf "$PREFECT_API_URL/health" >/dev/null && break
      kill -0 "$(cat "$RUN_DIR/server.pid")" 2>/dev/null || { echo "server exited; see $RUN_DIR/server.log"; exit 1; }
      sleep 1
    done
    curl -sf "$PREFECT_API_URL/health" >/dev/null || { echo "server not healthy after 120 s; see $RUN_DIR/server.log"; exit 1; }
    prefect work-pool inspect "$POOL" >/dev/null 2>&1 || prefect work-pool create "$POOL" --type process >/dev/null
    prefect --no-prompt deploy --all
    start worker prefect worker start --pool "$POOL" --type process
    # leave the prefect CLI pointed at this server in any shell: a profile `medssl`, made active (the one it
    # replaces is restored by `down`)
    profiles=${PREFECT_HOME:-$HOME/.prefect}/profiles.toml
    previous=$(sed -n 's/^active = "\(.*\)"$/\1/p' "$profiles" 2>/dev/null || true)
    [[ -f $RUN_DIR/previous-profile || ${previous:-ephemeral} == medssl ]] || echo "${previous:-ephemeral}" >"$RUN_DIR/previous-profile"
    prefect profile create medssl >/dev/null 2>&1 || true
    prefect --profile medssl config set PREFECT_API_URL="$PREFECT_API_URL" >/dev/null
    prefect profile use medssl >/dev/null
    echo "Prefect UI: http://127.0.0.1:$PORT  (prefect CLI profile 'medssl' -> $PREFECT_API_URL)"
    ;;
  down)
    stop worker INT
    stop server TERM
    if [[ -f $RUN_DIR/previous-profile ]]; then
      prefect profile use "$(cat "$RUN_DIR/previous-profile")" >/dev/null 2>&1 || true
      echo "prefect CLI profile back to '$(cat "$RUN_DIR/previous-profile")'"
      rm -f "$RUN_DIR/previous-profile"
    fi
    ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
