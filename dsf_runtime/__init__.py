"""dsf-runtime: compress LLaMA-family models with Double Sparse Factorization and run them sparsely.

Public API (importing the package also lets transformers'
AutoModelForCausalLM.from_pretrained load DSF checkpoints):
    load_model(ckpt_dir, device="cpu", backend="auto") -> (model, tokenizer)
    compress(model, out_dir, sparsity=0.5, preset="fast", ...) -> checkpoint path
    DSFLinear: the y = L (R x) + b module
"""

from __future__ import annotations

from dsf_runtime.checkpoint import load_model
from dsf_runtime.hf import register as _register_with_transformers
from dsf_runtime.linear import DSFLinear

_register_with_transformers()  # AutoModelForCausalLM.from_pretrained(dsf_checkpoint) works after import

__all__ = ["DSFLinear", "compress", "load_model"]
__version__ = "0.1.0"


def compress(model: str, out_dir: str, sparsity: float = 0.5, preset: str = "fast", **options):
    """Compress a model directory (or 'smollm2-135m') with DSF into a checkpoint directory."""
    from dsf_runtime.converters.pipeline import make_job, run_compress

    path, _ = run_compress(make_job(model, out_dir, sparsity=sparsity, preset_name=preset, **options))
    return path
