"""`dsf export CKPT OUT --to compressed-tensors`: our checkpoints for tools that read
compressed-tensors' sparse-bitmask format (vLLM before 2026, llm-compressor, SparseML).

One-matrix layers (SparseGPT, Wanda, magnitude, or a converted pruned model) are written
as sparse-bitmask modules: our bitmap's 32-column words are, byte by byte little-endian,
its bitmask rows, and the values go as they are stored. A DSF factor pair has no such
form: it is exported as its dense product L @ R, with a note that the factor structure
(and its speed) is lost, or refused when ``keep_sparse`` asks for a sparse export.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from dsf_runtime.checkpoint import CONFIG_NAME, TOKENIZER_FILES, _unique_state, load_model, read_quant_config
from dsf_runtime.errors import ConfigError
from dsf_runtime.formats.bitmap import row_popcounts
from dsf_runtime.patch import dsf_modules

# the compressed-tensors release whose sparse-bitmask layout and config keys this writes
CT_VERSION = "0.14.0.1"


def _bitmask_tensors(prefix: str, module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    rows, cols = module.L.shape
    stored = module.L.stored()
    if module.fmt == "bitmap" and stored["values"].is_floating_point():
        bitmap, values = stored["bitmap"], stored["values"]  # as stored: the same bits
    else:  # another format, or int8 values (dequantized): from the dense matrix
        from dsf_runtime.formats import get_format

        dense = module.L.to_dense().to(dtype)
        bitmap = get_format("bitmap").pack(dense, dtype)["bitmap"]
        values = dense[dense != 0]
    counts = row_popcounts(bitmap)
    return {
        f"{prefix}.shape": torch.tensor([rows, cols], dtype=torch.int64),
        f"{prefix}.bitmask": bitmap.contiguous().view(torch.uint8)[:, : (cols + 7) // 8].contiguous(),
        f"{prefix}.compressed": values.contiguous(),
        f"{prefix}.row_offsets": torch.cumsum(counts, 0) - counts,
    }


def export_compressed_tensors(
    ckpt: str | os.PathLike, out: str | os.PathLike, keep_sparse: bool = False, overwrite: bool = False
) -> tuple[Path, list[str]]:
    """Write ``ckpt`` in compressed-tensors' sparse-bitmask format: (path, notes)."""
    from safetensors.torch import save_file

    config, _ = read_quant_config(ckpt)
    model, tokenizer = load_model(ckpt, backend="dense-ref", with_tokenizer=False)
    pairs = sorted(name for name, m in dsf_modules(model).items() if m.R is not None)
    if pairs and keep_sparse:
        raise ConfigError(
            f"{len(pairs)} layers are DSF factor pairs (e.g. {pairs[0]}): compressed-tensors has no two-matrix "
            "form, so they can only be exported as their dense product; drop --keep-sparse to do that"
        )
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; choose another directory (or --overwrite)")
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    modules = dsf_modules(model)
    state, ignore = {}, ["lm_head"]
    for name, tensor in _unique_state(model).items():  # tied weights once
        if name.rsplit(".", 2)[0] in modules or name.rsplit(".", 1)[0] in modules:
            continue  # a DSF layer's factor tensors or bias: written below in the target layout
        state[name] = tensor
    for name, module in modules.items():
        if module.R is None:
            state.update(_bitmask_tensors(name, module, dtype))
        else:
            state[f"{name}.weight"] = module.to_dense_weight().to(dtype)
            ignore.append(name)
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias.detach()
    notes = []
    if pairs:
        notes.append(
            f"{len(pairs)} DSF factor pairs were exported as dense products L @ R (stored dense, listed in "
            "ignore): the factor structure and its speed are lost; keep the DSF checkpoint to run them sparsely"
        )
    total = sum(m.L.shape[0] * m.L.shape[1] for m in modules.values() if m.R is None)
    nnz = sum(m.L.nnz for m in modules.values() if m.R is None)
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "sparsity_config": {
            "format": "sparse-bitmask",
            "targets": ["Linear"],
            "ignore": ignore,
            "global_sparsity": 1 - nnz / total if total else 0.0,
            "sparsity_structure": "unstructured",
        },
        "version": CT_VERSION,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        for extra in (*TOKENIZER_FILES, "chat_template.jinja", "special_tokens_map.json"):
            if (Path(ckpt) / extra).is_file():
                shutil.copy2(Path(ckpt) / extra, tmp / extra)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, notes
