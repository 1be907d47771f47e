#!/usr/bin/env bash
# GPU checks for a lent CUDA machine (no network there): install dsf-runtime from the
# working tree (its missing pure-Python dependencies travel as wheels in .whl/),
# run the CUDA tests, then `dsf bench gpu`. Everything lands in $OUT (or ./gpu-out):
# log.txt and gpu/ (the benchmark's JSON/markdown/PNG).
# Each step has its own time limit so that one hang cannot eat the whole lease.
# PARTS picks the benchmark parts (default: layer tune decode convert); TESTS=0 skips the tests
# (a second command of the same loan: the limits add up to more than one command's 600 s).
# DRY_RUN=1 rehearses it all on a machine without a GPU: no install, the tests as they
# run there (CUDA ones skip), every benchmark part on the CPU in Triton's interpreter
# with tiny shapes (dsf bench gpu --dry-run). PYTHON picks the interpreter (python3).
set -u
PY=${PYTHON:-python3}
DRY=()
NOTE=""
if [ "${DRY_RUN:-0}" = 1 ]; then
  export TRITON_INTERPRET=1
  DRY=(--dry-run)
  NOTE=" (dry run)"
fi
OUT=${OUT:-gpu-out}
mkdir -p "$OUT/gpu"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
step() { echo "=== $* ($(date +%T))" | tee -a "$LOG"; }
run() { local limit=$1; shift; timeout -s INT "$limit" "$@" 2>&1 | tee -a "$LOG" | tail -n "${TAIL:-40}"; echo "rc=${PIPESTATUS[0]}" | tee -a "$LOG"; }

step environment
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader \
    || echo "no nvidia-smi here$NOTE"
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"; } 2>&1 | tee -a "$LOG"

step install
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "dry run: the environment is used as it is" | tee -a "$LOG"
elif ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -3 | tee -a "$LOG"
  export PYTHONPATH=/tmp/site
fi
[ "${DRY_RUN:-0}" = 1 ] || "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3 | tee -a "$LOG"
"$PY" -c "import dsf_runtime, pydantic; from dsf_runtime.kernels import BACKENDS; print('backends available on cuda:', [n for n, b in BACKENDS.items() if 'cuda' in b.devices and b.available()])" 2>&1 | tee -a "$LOG"

step "pytest: CUDA tests"
[ "${TESTS:-1}" = 0 ] && echo "skipped (TESTS=0)" | tee -a "$LOG" || TAIL=8 run "${PYTEST_LIMIT:-150}" "$PY" -m pytest -q -p no:cacheprovider --maxfail=20 --no-header -rfE \
  ${PYTEST_FILES:-tests/test_cuda.py tests/kernels/test_triton_bitmap.py tests/kernels/test_cupy_backends.py tests/kernels/test_cupy_bitmap.py tests/benchmarks/test_gpu.py tests/kernels/test_backends.py tests/test_linear.py tests/test_checkpoint.py}

for part in ${PARTS:-layer tune decode convert}; do
  step "dsf bench gpu: $part"
  case $part in
    layer) TAIL=60 run "${LAYER_LIMIT:-180}" "$PY" -m dsf_runtime.cli bench gpu "${DRY[@]}" --parts layer --out "$OUT/gpu" ;;
    tune) TAIL=4 run "${TUNE_LIMIT:-180}" "$PY" -m dsf_runtime.cli bench gpu "${DRY[@]}" --parts tune --out "$OUT/gpu" ;;
    decode) run "${DECODE_LIMIT:-180}" "$PY" -m dsf_runtime.cli bench gpu "${DRY[@]}" --parts decode --stack-layers "${STACK_LAYERS:-2}" --out "$OUT/gpu" ;;
    convert) run "${CONVERT_LIMIT:-90}" "$PY" -m dsf_runtime.cli bench gpu "${DRY[@]}" --parts convert --convert-layers "${CONVERT_LAYERS:-2}" --out "$OUT/gpu" ;;
  esac
done
step done
