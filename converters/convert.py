"""`dsf convert`: sparse models made elsewhere -> our checkpoint, run by our kernels.

Two kinds of source:
- compressed-tensors sparse checkpoints (sparse-bitmask, sparse-24-bitmask), read by
  dsf_runtime.ct_reader without building dense weights;
- pruned models saved as ordinary dense safetensors full of zeros (how Wanda, SparseGPT
  and the DSF authors' scripts save results): each linear whose zero fraction reaches
  ``min_sparsity`` is packed as one sparse matrix with its values in the model's own
  dtype (lossless: unpacking gives the same bits), the others stay dense.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dsf_runtime.checkpoint import TOKENIZER_FILES, build_model, save_checkpoint
from dsf_runtime.ct_reader import is_compressed_tensors, read_compressed_tensors
from dsf_runtime.errors import ConfigError
from dsf_runtime.formats.values import VALUE_DTYPES

CONVERSION_LOG = "conversion_log.json"
_VALUE_NAMES = {dtype: name for name, dtype in VALUE_DTYPES.items() if dtype.is_floating_point}


@dataclass
class LayerConversion:
    name: str
    shape: tuple[int, int]
    sparsity: float  # fraction of zero weights
    packed: bool


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    min_sparsity: float = 0.3,
    fmt: str = "bitmap",
    overwrite: bool = False,
    value_dtype: str | None = None,
) -> tuple[Path, list[LayerConversion]]:
    """Write ``src`` as a DSF checkpoint at ``out``: (path, what happened to each linear).
    ``value_dtype`` (pruned dense sources): store the packed values in this dtype instead
    of the model's own (e.g. bfloat16 for an fp32 model: half the value bytes, rounded)."""
    if not 0 < min_sparsity < 1:
        raise ConfigError(f"--min-sparsity must be between 0 and 1 (exclusive), got {min_sparsity}")
    src = Path(src) if Path(src).exists() else src
    if is_compressed_tensors(src):
        if fmt != "bitmap" or value_dtype:
            raise ConfigError("compressed-tensors checkpoints convert as stored: bitmap format, their own values")
        config, quant, read_state = read_compressed_tensors(src)
        model, tokenizer = build_model(config, quant, read_state, Path(src), with_tokenizer=_has_tokenizer(src))
        rows = [
            LayerConversion(
                name, (e.out_features, e.in_features), 1 - e.nnz_left / (e.out_features * e.in_features), True
            )
            for name, e in quant.modules.items()
        ]
    else:
        model, tokenizer, quant, rows = _pack_pruned_dense(src, min_sparsity, fmt, value_dtype)
    log = json.dumps({"source": str(src), "min_sparsity": min_sparsity, "layers": [asdict(r) for r in rows]}, indent=1)
    path = save_checkpoint(model, tokenizer, out, quant, overwrite=overwrite, extra_files={CONVERSION_LOG: log})
    return path, rows


def _has_tokenizer(path: str | os.PathLike) -> bool:
    return any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def _pack_pruned_dense(src, min_sparsity: float, fmt: str, value_dtype: str | None = None):
    from dsf_runtime.converters.pack import pack_model
    from dsf_runtime.models import compressible_linears, load_dense, read_config_dict, resolve_model_dir

    config = read_config_dict(resolve_model_dir(src))
    dtype = VALUE_DTYPES.get(str(config.get("dtype") or config.get("torch_dtype") or "float32"), torch.float32)
    model, tokenizer = load_dense(src, dtype=dtype)
    rows, factors, zeros, total = [], {}, 0, 0
    for name in compressible_linears(model):
        weight = model.get_submodule(name).weight.detach()
        zero = int((weight == 0).sum())
        sparsity = zero / weight.numel()
        packed = sparsity >= min_sparsity
        rows.append(LayerConversion(name, tuple(weight.shape), sparsity, packed))
        if packed:
            factors[name] = (weight, None)
            zeros, total = zeros + zero, total + weight.numel()
    if not factors:
        most = max(r.sparsity for r in rows)
        raise ConfigError(
            f"no linear layer of {src} has {min_sparsity:.0%} zeros (the sparsest has {most:.1%}): "
            "nothing to pack; lower --min-sparsity or prune the model first"
        )
    value_dtype = value_dtype or _VALUE_NAMES.get(dtype, "float32")
    quant = pack_model(model, factors, sparsity=zeros / total, fmt=fmt, value_dtype=value_dtype, method="pruned dense")
    return model, tokenizer, quant, rows
