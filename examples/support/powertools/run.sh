#!/usr/bin/env bash
# Runs bench.py (AWS Lambda Powertools' idempotency utility on a local Redis) in a
# virtual environment of its own, created on first use from requirements.txt under the
# workspace's target folder (or $IDEMPOTENT_POWERTOOLS_VENV). Arguments go to bench.py.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${IDEMPOTENT_POWERTOOLS_VENV:-$here/../../../target/powertools-venv}
stamp="$venv/.requirements"
if [ ! -x "$venv/bin/python" ] || ! cmp -s "$here/requirements.txt" "$stamp"; then
    echo "creating the Powertools virtual environment in $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt" >&2
    cp "$here/requirements.txt" "$stamp"
fi
exec "$venv/bin/python" "$here/bench.py" "$@"
