#!/usr/bin/env bash
# Runs the test suite on a fresh machine: creates .venv if needed, installs the package with its
# dev extra and the CPU build of torch (pinned: an unpinned torch pulls a multi-GB CUDA build),
# then runs ruff, mypy and pytest. Safe to run twice. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.logitcache-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[dev,hf]"
  touch "$stamp"
fi
ruff check logitcache tests scripts
mypy
python -m pytest -q "$@"
