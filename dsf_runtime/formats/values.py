"""Value encodings shared by the row-oriented formats (bitmap, csr).

16/32-bit floats are stored as they are. ``int8`` stores each nonzero as a signed
byte with one fp32 scale per row (symmetric, scale = max |row| / 127): half the value
bytes of fp16, so a 50% DSF layer takes about 0.75 bytes per dense weight instead of
1.25 in the bitmap format. Formats call these helpers so that every format encodes,
decodes and validates values the same way."""

from __future__ import annotations

from typing import Literal, get_args

import torch

from dsf_runtime.errors import ConfigError
from dsf_runtime.formats import TensorSpec, all_finite

INT8_MAX = 127

# The value dtypes a checkpoint may store, by the name written in its metadata: the one
# definition every layer (checkpoint, converters, CLI, benchmarks) uses.
ValueDtypeName = Literal["bfloat16", "float16", "float32", "int8"]
VALUE_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "int8": torch.int8,
}
DEFAULT_VALUE_DTYPE: ValueDtypeName = "bfloat16"  # fp32's exponent range in fp16's bytes
assert tuple(VALUE_DTYPES) == get_args(ValueDtypeName)

# The dtypes a model may run in (dense parts, activations, KV cache), by the name the
# CLI's --dtype and the serving options take.
MODEL_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def is_int8(value_dtype: torch.dtype) -> bool:
    return value_dtype == torch.int8


def value_specs(rows: int, nnz: int, value_dtype: torch.dtype) -> dict[str, TensorSpec]:
    """The value tensors of a matrix with ``rows`` rows and ``nnz`` stored values."""
    specs = {"values": TensorSpec((nnz,), value_dtype)}
    if is_int8(value_dtype):
        specs["scales"] = TensorSpec((rows,), torch.float32)
    return specs


def _row_of_each(crow: torch.Tensor) -> torch.Tensor:
    """Row index of every stored value, (nnz,), from row offsets (rows + 1,)."""
    crow64 = crow.long()
    return torch.repeat_interleave(torch.arange(crow64.numel() - 1, device=crow.device), crow64.diff())


def encode_values(values: torch.Tensor, crow: torch.Tensor, value_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Row-major nonzero values (nnz,) -> {"values"} or, for int8, {"values", "scales"}."""
    if not is_int8(value_dtype):
        stored = values.to(value_dtype)
        if value_dtype == torch.float16 and not all_finite(stored) and all_finite(values):
            # float16 tops out at 65504: a larger factor value would be stored as inf
            # (and every output it touches with it) instead of refused
            big = float(values.float().abs().max())
            raise ConfigError(
                f"a nonzero value of magnitude {big:.4g} does not fit float16 (largest 65504): "
                "store the values as bfloat16 or float32 (--value-dtype)"
            )
        return {"values": stored}
    rows = crow.numel() - 1
    v = values.float()
    row = _row_of_each(crow)
    absmax = torch.zeros(rows, dtype=torch.float32).scatter_reduce_(0, row, v.abs(), reduce="amax")
    scales = absmax / INT8_MAX
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(v / safe[row]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return {"values": q, "scales": scales}


def decode_values(tensors: dict[str, torch.Tensor], crow: torch.Tensor) -> torch.Tensor:
    """The stored values as numbers: float32 for int8 (value times its row's scale)."""
    values = tensors["values"]
    if not is_int8(values.dtype):
        return values
    return values.float() * tensors["scales"][_row_of_each(crow)]


def check_value_tensors(tensors: dict[str, torch.Tensor], rows: int) -> None:
    """Finite float values; for int8, finite non-negative per-row scales."""
    values = tensors["values"]
    if is_int8(values.dtype):
        scales = tensors.get("scales")
        if scales is None or scales.numel() != rows:
            raise ValueError(f"int8 values need {rows} row scales")
        if not all_finite(scales) or (scales.numel() and float(scales.min()) < 0):
            raise ValueError("scales contain NaN, Inf or negative numbers")
    elif not all_finite(values):
        raise ValueError("values contain NaN or Inf")
