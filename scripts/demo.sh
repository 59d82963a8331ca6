#!/usr/bin/env bash
# The first command of the README: sets up .venv, then writes a small cache of real teacher
# targets and reads it back (scripts/roundtrip_example.py), then shows `logitcache info/verify`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
out=${1:-demo-out/roundtrip-cache}
python scripts/roundtrip_example.py "$out"
logitcache info "$out"
logitcache verify "$out"
