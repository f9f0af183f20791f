#!/usr/bin/env bash
# `make upstream`: the canaries (tests/test_upstream_canaries.py) and a few end-to-end tests
# against the newest Celery, kombu and Flower of the major versions this project pins, with the
# newest urllib3, requests, redis and prometheus_client they accept, in a venv of their own
# (.venv-upstream). The project keeps its exact pins; this says, before anyone upgrades, whether
# the newest releases still run it, and a failing canary names what changed upstream.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${UPSTREAM_VENV:-.venv-upstream}
PY=$VENV/bin/python
[ -x "$PY" ] || "${PYTHON:-python3}" -m venv "$VENV"
"$PY" -m pip install -q -U pip

# The project's requirements (its own and the dev extra's), each exact pin widened to its major
# version: celery[redis]==5.7.0 becomes celery[redis]>=5.7.0,<6.
"$PY" - > "$VENV/requirements.txt" <<'PYTHON'
import re
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["dev"]:
    if requirement.startswith("download-workers-client"):
        continue  # this checkout's own client/, installed below
    pinned = re.fullmatch(r"([^=<>!~;\s]+)==(\d+)([\d.]*)(\s*;.*)?", requirement)
    if pinned:
        name, major, rest, marker = pinned.groups()
        requirement = f"{name}>={major}{rest},<{int(major) + 1}{marker or ''}"
    print(requirement)
PYTHON
# kombu and billiard come with Celery, prometheus_client with Flower, redis with celery[redis]:
# named so that the newest each accepts is taken, not what an earlier run left.
"$PY" -m pip install -q -U --upgrade-strategy eager -r "$VENV/requirements.txt" \
    'kombu<6' 'billiard<5' 'prometheus_client<1' 'urllib3<3' 'requests<3'
# The client first: pip checks the workers' requirement on it when it installs them.
"$PY" -m pip install -q --no-deps -e ./client
"$PY" -m pip install -q --no-deps -e .

echo "newest releases under test:"
"$PY" -m pip list --format=freeze 2>/dev/null \
    | grep -iE '^(celery|kombu|billiard|flower|urllib3|requests|redis|prometheus.client|vine|amqp)==' \
    | sed 's/^/  /'

# The canaries, then the parts that lean on Celery, kombu and Flower end to end: the worker's
# downloads, the backend, the transport in a Redis outage, Flower's API and task states.
exec "$PY" -m pytest -n "${UPSTREAM_JOBS:-2}" -p no:cacheprovider \
    tests/test_upstream_canaries.py \
    tests/test_settings.py \
    tests/test_backend.py \
    tests/test_redis_transport.py \
    tests/test_redis_outage_e2e.py \
    tests/test_worker_e2e.py \
    tests/test_flower_e2e.py \
    tests/test_refusals_e2e.py \
    tests/security/test_secrets.py \
    "$@"
