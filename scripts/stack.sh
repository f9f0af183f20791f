#!/usr/bin/env bash
# `make run`: Redis (the one at CELERY_BROKER_URL if it answers, else a private redis-server),
# one worker and Flower (basic auth, 127.0.0.1), all in the foreground; Ctrl-C stops everything.
# Each component runs in a process group of its own, which this script stops (TERM, then KILL
# after STOP_GRACE seconds) on Ctrl-C, on TERM, on any exit: however it is run (a terminal,
# `make run 2>&1 | tee log`, a TERM to make or to it), nothing it started outlives it.
set -euo pipefail
# After Ctrl-C in `make run | tee log`, tee is gone: a message to it must fail (EPIPE), not kill
# this script before it stops the rest.
trap '' PIPE
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN="$PWD/.run"  # absolute: redis-server resolves --logfile after changing to --dir
mkdir -p "$RUN"
export CELERY_BROKER_URL=${CELERY_BROKER_URL:-redis://localhost:6379/0}
# Where results live is decided by the settings (download_client.settings.result_backend_for),
# the same function the worker, Flower, the client and the CLI use: CELERY_RESULT_BACKEND is
# left as it is, so every component derives the same place from the broker when it is unset.
FLOWER_PORT=${FLOWER_PORT:-5555}
# Flower reads its options from FLOWER_* variables: nothing secret goes on a command line, where
# `ps` would show it to every user of the machine.
# The task list's columns, all within a 1400 px window: a running download's progress ("1.2 MiB
# of 4.8 MiB (25%)", the task-progress event's `result`), a failure's reason (`exception`), its
# redacted URL first in kwargs, how long it ran, where, its id. compose sets the same.
export FLOWER_TASKS_COLUMNS=${FLOWER_TASKS_COLUMNS:-name,state,result,kwargs,runtime,exception,worker,uuid}
# Workers offline for this many seconds leave Flower's worker list: `make demo` starts and stops
# a worker of its own against this Redis. `make run`'s own worker going away stops the stack,
# so nothing here is hidden by it (compose leaves it unset: there a lost worker must stay seen).
export FLOWER_PURGE_OFFLINE_WORKERS=${FLOWER_PURGE_OFFLINE_WORKERS:-10}

# A bad setting is one line here, not two Celery tracebacks after a banner.
"$PY" -c 'from download_client.settings import Settings, SettingsError
import sys
try:
    Settings.from_env()
except SettingsError as exc:
    sys.exit(f"error: {exc}")' || exit 2
RESULTS=$("$PY" -c 'from download_client.redact import redact_url
from download_client.settings import Settings
print(redact_url(Settings.from_env().result_backend))')
if "$PY" -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' "$FLOWER_PORT" 2>/dev/null; then
  echo "error: 127.0.0.1:$FLOWER_PORT is taken (is \`make run\` already running?). Stop it, or" >&2
  echo "  choose another port for Flower: FLOWER_PORT=5556 make run" >&2
  exit 2
fi

STOP_GRACE=${STOP_GRACE:-20}  # seconds for a worker's warm shutdown before KILL
pids=()  # each the leader of its component's process group
# Start "$@" in the background as the leader of a new process group: a terminal's Ctrl-C goes
# to the foreground group (make, this script, tee) and not to it; this script stops it.
own_group() {
  "$PY" -c 'import os, sys; os.setpgid(0, 0); os.execvp(sys.argv[1], sys.argv[1:])' "$@" &
  pids+=($!)
}
alive() { for pid in "${pids[@]}"; do kill -0 -- "-$pid" 2>/dev/null && return 0; done; return 1; }
every_one_alive() { for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null || return 1; done; }
stop() {  # $1: the exit status (0 after Ctrl-C, else the failure's)
  local rc=$1
  trap - EXIT
  trap '' INT TERM  # stopping is not interrupted by a second Ctrl-C
  set +e  # nor by a message to a closed pipe
  echo; echo "stopping: ${pids[*]:-nothing}"
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
  for _ in $(seq $((STOP_GRACE * 10))); do alive || break; sleep 0.1; done
  if alive; then
    echo "still running after ${STOP_GRACE} s: killing what is left"
    for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null; done
  fi
  wait 2>/dev/null
  echo "stopped"
  exit "$rc"
}
interrupted=0
trap 'interrupted=1' INT TERM  # what runs in the foreground (a readiness check) gets it too
trap 'stop $?' EXIT

# The broker URL may hold a password: Python reads it from the environment, not from argv.
pings() { "$PY" -c 'import os, redis; redis.Redis.from_url(os.environ["CELERY_BROKER_URL"], socket_timeout=1).ping()' 2>/dev/null; }

if pings; then
  echo "redis: using the one answering at $CELERY_BROKER_URL"
else
  port=$("$PY" -c 'import os; from urllib.parse import urlsplit; u = urlsplit(os.environ["CELERY_BROKER_URL"]); print(u.port or 6379 if u.hostname in ("localhost", "127.0.0.1") else "")')
  if [ -z "$port" ]; then
    echo "error: nothing answers at $CELERY_BROKER_URL and it is not a local address I can start." >&2
    exit 1
  fi
  if ! command -v redis-server >/dev/null; then
    echo "error: no Redis answers at $CELERY_BROKER_URL and redis-server is not installed." >&2
    echo "  Debian/Ubuntu: sudo apt-get install redis-server   macOS: brew install redis" >&2
    echo "  or run the whole stack in containers: docker compose up" >&2
    exit 1
  fi
  echo "redis: starting a private redis-server on 127.0.0.1:$port (data in $RUN/)"
  own_group redis-server --port "$port" --bind 127.0.0.1 --dir "$RUN" --appendonly yes \
    --maxmemory-policy noeviction --logfile "$RUN/redis.log"
  for _ in $(seq 50); do pings && break; sleep 0.1; done
  pings || { echo "error: redis-server did not start, see $RUN/redis.log" >&2; exit 1; }
fi

if [ -z "${FLOWER_BASIC_AUTH:-}" ]; then
  [ -s "$RUN/flower-password" ] || (umask 077; "$PY" -c 'import secrets; print(secrets.token_urlsafe(12))' > "$RUN/flower-password")
  export FLOWER_BASIC_AUTH="admin:$(cat "$RUN/flower-password")"
fi

own_group "$PY" -m celery -A worker worker -l info
echo "worker: starting; Flower starts once the worker answers a ping"
# Flower asks the workers what they are (inspect stats, conf...) as it starts: started before a
# worker answers, it logs an "Inspect method ... failed" warning for each question.
if ! "$PY" -m scripts.ready worker "${pids[-1]}"; then
  [ "$interrupted" = 1 ] && stop 0
  echo "error: the worker did not answer a ping (see its output above); stopping" >&2
  stop 1
fi
# FLOWER_BASIC_AUTH (and every other FLOWER_* setting) comes from the environment.
own_group "$PY" -m celery -A worker flower --address=127.0.0.1 --port="$FLOWER_PORT" --logging=warning
if ! "$PY" -m scripts.ready flower "$FLOWER_PORT" "${pids[-1]}"; then
  [ "$interrupted" = 1 ] && stop 0
  echo "error: Flower did not answer on 127.0.0.1:$FLOWER_PORT (see its output above); stopping" >&2
  stop 1
fi

# Last on the screen, below the banners: what to open and how to log in.
cat <<EOT

  ready
  flower:    http://127.0.0.1:$FLOWER_PORT/tasks
  user:      ${FLOWER_BASIC_AUTH%%:*}
  password:  ${FLOWER_BASIC_AUTH#*:}
  worker:    celery -A worker worker   (downloads go to ${DOWNLOAD_DIR:-./downloads})
  results:   $RESULTS
  submit:    .venv/bin/downloads submit https://example.com/file --wait
  Ctrl-C stops all of it.

EOT
# Until Ctrl-C or TERM, or until a component stops on its own. A short sleep waited on, not
# `wait -n` alone: a signal landing just before `wait -n` starts runs its trap first and would
# leave `wait -n` blocked for good, with everything still running.
while [ "$interrupted" = 0 ] && every_one_alive; do
  sleep 1 &
  wait $! 2>/dev/null || true
done
if [ "$interrupted" = 1 ]; then stop 0; fi
echo "error: a component stopped on its own (see its output above); stopping the rest" >&2
stop 1
