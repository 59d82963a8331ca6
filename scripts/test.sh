#!/usr/bin/env bash
# Runs the checks on a fresh machine: sets up .venv (scripts/_venv.sh), then ruff, mypy and
# pytest. Safe to run twice. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
ruff check logitcache tests scripts
mypy
python -m pytest -q "$@"
