#!/usr/bin/env bash
# `make run`: Redis (the one at CELERY_BROKER_URL if it answers, else a private redis-server),
# one worker and Flower (basic auth, 127.0.0.1), all in the foreground; Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN="$PWD/.run"  # absolute: redis-server resolves --logfile after changing to --dir
mkdir -p "$RUN"
export CELERY_BROKER_URL=${CELERY_BROKER_URL:-redis://localhost:6379/0}
# Where results live is decided by the settings (download_client.settings.result_backend_for),
# the same function the worker, Flower, the client and the CLI use: CELERY_RESULT_BACKEND is
# left as it is, so every component derives the same place from the broker when it is unset.
FLOWER_PORT=${FLOWER_PORT:-5555}

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

pids=()
stop() {  # $1: the exit status (0 after Ctrl-C, else the failure's)
  local rc=$1
  trap - INT TERM EXIT
  echo; echo "stopping: ${pids[*]:-nothing}"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  echo "stopped"
  exit "$rc"
}
interrupted=0
trap 'interrupted=1' INT TERM  # Ctrl-C reaches the components too; they stop, then we do
trap 'stop $?' EXIT

pings() { "$PY" -c 'import sys, redis; redis.Redis.from_url(sys.argv[1], socket_timeout=1).ping()' "$1" 2>/dev/null; }

if pings "$CELERY_BROKER_URL"; then
  echo "redis: using the one answering at $CELERY_BROKER_URL"
else
  port=$("$PY" -c 'import sys; from urllib.parse import urlsplit; u = urlsplit(sys.argv[1]); print(u.port or 6379 if u.hostname in ("localhost", "127.0.0.1") else "")' "$CELERY_BROKER_URL")
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
  redis-server --port "$port" --bind 127.0.0.1 --dir "$RUN" --appendonly yes \
    --maxmemory-policy noeviction --logfile "$RUN/redis.log" &
  pids+=($!)
  for _ in $(seq 50); do pings "$CELERY_BROKER_URL" && break; sleep 0.1; done
  pings "$CELERY_BROKER_URL" || { echo "error: redis-server did not start, see $RUN/redis.log" >&2; exit 1; }
fi

if [ -z "${FLOWER_BASIC_AUTH:-}" ]; then
  [ -s "$RUN/flower-password" ] || (umask 077; "$PY" -c 'import secrets; print(secrets.token_urlsafe(12))' > "$RUN/flower-password")
  export FLOWER_BASIC_AUTH="admin:$(cat "$RUN/flower-password")"
fi

"$PY" -m celery -A worker worker -l info &
pids+=($!)
"$PY" -m celery -A worker flower --address=127.0.0.1 --port="$FLOWER_PORT" \
  --basic-auth="$FLOWER_BASIC_AUTH" --logging=warning &
pids+=($!)

cat <<EOT

  worker:  celery -A worker worker   (downloads go to ${DOWNLOAD_DIR:-./downloads})
  results: $RESULTS
  flower:  http://127.0.0.1:$FLOWER_PORT   user/password: $FLOWER_BASIC_AUTH
  submit:  .venv/bin/downloads submit https://example.com/file --wait
  Ctrl-C stops all of it.

EOT
wait -n "${pids[@]}" || true
if [ "$interrupted" = 1 ]; then stop 0; fi
echo "error: a component stopped on its own (see its output above); stopping the rest" >&2
stop 1
