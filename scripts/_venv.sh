# Sourced by the scripts: create/refresh .venv with the package, its hf+dev extras and the CPU
# build of torch (pinned: an unpinned torch pulls a multi-GB CUDA build). Safe to run twice.
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
