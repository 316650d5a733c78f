#!/usr/bin/env bash
# One-shot GPU check: build monet._C in place for this machine's GPU, run every CUDA test, then the
# HF-path GPU benchmarks (training forward+backward, latent decoding). Writes logs and benchmark
# JSON into OUT_DIR. Uses the python3 on PATH (or $PYTHON), which must hold a CUDA build of torch
# and the packages of pyproject.toml; nothing is installed. Exits non-zero when a step fails.
#
#   scripts/gpu_check.sh OUT_DIR [--skip-tests] [BENCH_FILE ...]
#
# BENCH_FILEs default to benchmarks/bench_train_forward.py and benchmarks/bench_hf_decode.py.
set -u
USAGE="usage: scripts/gpu_check.sh OUT_DIR [--skip-tests] [BENCH_FILE ...]"
OUT=${1:?$USAGE}
shift
RUN_TESTS=1
if [ "${1:-}" = "--skip-tests" ]; then RUN_TESTS=0; shift; fi
BENCH=("$@")
[ ${#BENCH[@]} -eq 0 ] && BENCH=(benchmarks/bench_train_forward.py benchmarks/bench_hf_decode.py)
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG="$OUT/gpu_check.log"
step() { echo "=== $* ($(date +%T))" | tee -a "$LOG"; }

step "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)"
} >>"$LOG" 2>&1
CAP=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || { echo "no CUDA device" | tee -a "$LOG"; exit 1; }

step "build monet._C for sm_${CAP/./}"
MONET_CUDA_ARCHS="$CAP" MAX_JOBS=${MAX_JOBS:-16} timeout 200 "$PY" setup.py -q build_ext --inplace >>"$LOG" 2>&1 \
  || { echo "build failed" | tee -a "$LOG"; tail -40 "$LOG"; exit 1; }
"$PY" -c "import monet.ops.native as n, sys; print('monet._C:', n.available()); sys.exit(not n.available())" \
  >>"$LOG" 2>&1 || { echo "monet._C did not load" | tee -a "$LOG"; exit 1; }
STATUS=0

if [ $RUN_TESTS = 1 ]; then
  step "CUDA tests"
  timeout -s INT -k 20 150 "$PY" -m pytest -q -p no:cacheprovider -k cuda tests/test_ops.py tests/test_generate.py \
    tests/test_latent_forward.py >>"$LOG" 2>&1
  rc=$?; echo "CUDA tests exit code $rc" | tee -a "$LOG"; [ $rc = 0 ] || STATUS=1
fi

step "GPU benchmarks"
timeout -s INT -k 20 260 "$PY" -m pytest -q -p no:cacheprovider "${BENCH[@]}" \
  --bench-device cuda --bench-threads 0 --bench-out "$OUT" >>"$LOG" 2>&1
rc=$?; echo "benchmarks exit code $rc" | tee -a "$LOG"; [ $rc = 0 ] || STATUS=1
step "done"
tail -60 "$LOG"
exit $STATUS
