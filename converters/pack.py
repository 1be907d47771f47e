"""Factor pairs (dense-with-zeros) -> a model with DSFLinear modules -> a checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from dsf_runtime.checkpoint import DSFQuantConfig, ModuleEntry, save_checkpoint
from dsf_runtime.patch import dsf_modules, replace_with_factors

VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def pack_model(
    model: nn.Module,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
    *,
    sparsity: float,
    fmt: str = "csr",
    value_dtype: str = "float16",
    method: str = "dsf",
    factorization: dict | None = None,
) -> DSFQuantConfig:
    """Swap the named linears of ``model`` for packed DSFLinear modules (in place)
    and return the checkpoint metadata describing them."""
    replace_with_factors(model, factors, fmt, VALUE_DTYPES[value_dtype])
    modules = {
        name: ModuleEntry(
            out_features=m.out_features,
            in_features=m.in_features,
            rank=m.rank,
            nnz_left=m.L.nnz,
            nnz_right=m.R.nnz if m.R is not None else 0,
            bias=m.bias is not None,
        )
        for name, m in dsf_modules(model).items()
    }
    return DSFQuantConfig(
        format=fmt,
        value_dtype=value_dtype,
        sparsity=sparsity,
        method=method,
        factorization=factorization or {},
        modules=modules,
    )


def write_packed(
    model: nn.Module,
    tokenizer,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    **pack_options,
) -> Path:
    """pack_model + save_checkpoint (``extra_files``: name -> text written beside it)."""
    quant = pack_model(model, factors, **pack_options)
    return save_checkpoint(model, tokenizer, out_dir, quant, overwrite=overwrite, extra_files=extra_files)
