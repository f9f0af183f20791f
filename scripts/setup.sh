#!/usr/bin/env bash
# What the test suite runs for real, from Debian's packages: Redis; RabbitMQ (its scripts start
# the tests' private node; the package's own service is never used); tinyproxy (the egress proxy
# tests); chromium (the headless browser that reads Flower's task list); node and npm with the
# npm packages of tests/node/ (celery-node, a producer nobody here wrote); promtool (checks
# deploy/prometheus); curl (the docs' curl examples). Called by `make test` and by CI.
# As root, what is missing is installed; as another user, it is named in one line and the script
# stops before anything else runs.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v make >/dev/null || need+=(make)
command -v curl >/dev/null || need+=(curl)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
{ command -v node >/dev/null && command -v npm >/dev/null; } || need+=(nodejs npm)
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need+=(rabbitmq-server)
command -v tinyproxy >/dev/null || need+=(tinyproxy)
command -v chromium >/dev/null || need+=(chromium)
# promtool comes with the prometheus package, installed without its recommends (no node
# exporter); its own Prometheus service is never used.
bare=()
command -v promtool >/dev/null || bare+=(prometheus)

missing=("${need[@]}" "${bare[@]}")
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$EUID" -ne 0 ]; then
    echo "the tests need these Debian packages: ${missing[*]} (as root: apt-get install ${missing[*]}, or run this script as root)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  [ ${#need[@]} -eq 0 ] || apt-get install -y -qq "${need[@]}" >/dev/null
  [ ${#bare[@]} -eq 0 ] || apt-get install -y -qq --no-install-recommends "${bare[@]}" >/dev/null
fi

# The npm packages, again only when the lock file changed since they were installed.
stamp=tests/node/node_modules/.package-lock.json
if [ ! -f "$stamp" ] || [ tests/node/package-lock.json -nt "$stamp" ]; then
  (cd tests/node && npm ci --no-audit --no-fund --silent)
fi
