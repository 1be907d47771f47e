"""Factor pairs (dense-with-zeros) -> a model with DSFLinear modules -> a checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from dsf_runtime.checkpoint import DEFAULT_VALUE_DTYPE, VALUE_DTYPES, DSFQuantConfig, ModuleEntry, save_checkpoint
from dsf_runtime.errors import ConfigError
from dsf_runtime.formats import get_format
from dsf_runtime.patch import dsf_modules, replace_with_factors


def check_storage(fmt: str, value_dtype: str) -> None:
    """ConfigError unless format ``fmt`` can store values of ``value_dtype`` (e.g. bsr
    stores no int8), checked before any work is done."""
    if value_dtype not in VALUE_DTYPES:
        raise ConfigError(f"unknown value dtype {value_dtype!r}; choose one of {', '.join(VALUE_DTYPES)}")
    try:
        get_format(fmt).specs((1, 1), 1, VALUE_DTYPES[value_dtype])
    except (KeyError, ValueError) as exc:
        raise ConfigError(str(exc).strip("'\"")) from None


def pack_model(
    model: nn.Module,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
    *,
    sparsity: float,
    fmt: str = "bitmap",
    value_dtype: str = DEFAULT_VALUE_DTYPE,
    method: str = "dsf",
    factorization: dict | None = None,
    format_options: dict | None = None,
) -> DSFQuantConfig:
    """Swap the named linears of ``model`` for packed DSFLinear modules (in place)
    and return the checkpoint metadata describing them."""
    check_storage(fmt, value_dtype)
    replace_with_factors(model, factors, fmt, VALUE_DTYPES[value_dtype], **(format_options or {}))
    modules = {
        name: ModuleEntry(
            out_features=m.out_features,
            in_features=m.in_features,
            rank=m.rank,
            nnz_left=m.L.nnz,
            nnz_right=m.R.nnz if m.R is not None else 0,
            bias=m.bias is not None,
            extra_left=m.L.extra,
            extra_right=m.R.extra if m.R is not None else {},
        )
        for name, m in dsf_modules(model).items()
    }
    return DSFQuantConfig(
        format=fmt,
        format_options=format_options or {},
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
    max_shard_bytes: int | None = None,
    **pack_options,
) -> Path:
    """pack_model + save_checkpoint (``extra_files``: name -> text written beside it)."""
    quant = pack_model(model, factors, **pack_options)
    shard = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    return save_checkpoint(model, tokenizer, out_dir, quant, overwrite=overwrite, extra_files=extra_files, **shard)


def repack(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    fmt: str,
    value_dtype: str | None = None,
    overwrite: bool = False,
    **format_options,
) -> Path:
    """Convert a checkpoint to another storage format (values are unpacked and packed
    again: exact when the value dtype is kept)."""
    from dsf_runtime.checkpoint import load_model, read_quant_config

    _, quant = read_quant_config(ckpt_dir)
    model, tokenizer = load_model(ckpt_dir, backend="dense-ref")
    factors = {
        name: (m.L.to_dense(), None if m.R is None else m.R.to_dense()) for name, m in dsf_modules(model).items()
    }
    new = pack_model(
        model,
        factors,
        sparsity=quant.sparsity,
        fmt=fmt,
        value_dtype=value_dtype or quant.value_dtype,
        method=quant.method,
        factorization=quant.factorization,
        format_options=format_options,
    )
    extra = {}
    log_file = Path(ckpt_dir) / "compression_log.json"
    if log_file.exists():
        extra[log_file.name] = log_file.read_text()
    return save_checkpoint(model, tokenizer, out_dir, new, overwrite=overwrite, extra_files=extra)


def read_external_factors(
    path: str | os.PathLike, transposed: bool = False
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Factor pairs from a safetensors file made by any DSF implementation.

    Naming convention: ``<module path>.L`` (out x r) and ``<module path>.R`` (r x in),
    dense with zeros, for a pair; ``<module path>.weight`` (out x in) for a single
    pruned matrix. With ``transposed`` the file holds L^T (r x out) and R^T (in x r)."""
    from safetensors.torch import load_file

    from dsf_runtime.errors import CheckpointError

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    factors: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for key in tensors:
        module, _, suffix = key.rpartition(".")
        if suffix not in ("L", "R", "weight") or not module:
            raise CheckpointError(f"{path}: tensor {key!r} is not named <module>.L, <module>.R or <module>.weight")
    modules = {k.rpartition(".")[0] for k in tensors}
    for module in sorted(modules):
        has = {s for s in ("L", "R", "weight") if f"{module}.{s}" in tensors}
        if has == {"weight"}:
            factors[module] = (tensors[f"{module}.weight"].float(), None)
        elif has == {"L", "R"}:
            L, R = tensors[f"{module}.L"].float(), tensors[f"{module}.R"].float()
            if transposed:
                L, R = L.t().contiguous(), R.t().contiguous()
            factors[module] = (L, R)
        else:
            raise CheckpointError(f"{path}: module {module!r} has {sorted(has)}; need both L and R, or weight alone")
        for t in factors[module]:
            if t is not None and (t.dim() != 2 or not bool(torch.isfinite(t).all())):
                raise CheckpointError(f"{path}: {module} has a non-matrix or non-finite factor")
    return factors


def pack_external(
    factors_file: str | os.PathLike,
    base_model: str,
    out_dir: str | os.PathLike,
    fmt: str = "bitmap",
    value_dtype: str = DEFAULT_VALUE_DTYPE,
    transposed: bool = False,
    overwrite: bool = False,
    **format_options,
) -> Path:
    """Check external factor pairs against the base model's shapes and write a checkpoint."""
    from dsf_runtime.errors import CheckpointError
    from dsf_runtime.models import load_dense

    factors = read_external_factors(factors_file, transposed)
    model, tokenizer = load_dense(base_model)
    dense_count = nnz = 0
    for name, (L, R) in factors.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{factors_file}: the base model has no module {name!r}") from None
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"{factors_file}: {name} is a {type(linear).__name__}, not a linear layer")
        rows, cols = L.shape[0], (L.shape[1] if R is None else R.shape[1])
        if (rows, cols) != (linear.out_features, linear.in_features) or (R is not None and L.shape[1] != R.shape[0]):
            got = f"L {tuple(L.shape)}" + ("" if R is None else f", R {tuple(R.shape)}")
            raise CheckpointError(
                f"{factors_file}: {name} is {linear.out_features}x{linear.in_features} but the file gives {got}"
                + ("" if transposed else " (stored transposed? try --transposed)")
            )
        dense_count += rows * cols
        nnz += int((L != 0).sum()) + (0 if R is None else int((R != 0).sum()))
    if not factors:
        raise CheckpointError(f"{factors_file} holds no factors")
    sparsity = 1.0 - nnz / dense_count
    if not 0.0 < sparsity < 1.0:
        raise CheckpointError(f"{factors_file}: the factors hold {nnz} nonzeros for {dense_count} weights: not sparse")
    quant = pack_model(
        model,
        factors,
        sparsity=round(sparsity, 6),
        fmt=fmt,
        value_dtype=value_dtype,
        method="external",
        factorization={"source": Path(factors_file).name},
        format_options=format_options,
    )
    return save_checkpoint(model, tokenizer, out_dir, quant, overwrite=overwrite)
