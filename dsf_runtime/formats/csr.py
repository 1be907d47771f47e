"""CSR: row offsets (int32, rows + 1), column indices, values (nnz).

Column indices are int16 when the matrix has at most 32768 columns (every LLaMA
factor up to 32k wide), else int32: 2 bytes saved per nonzero. The width is recorded
in the metadata (``index_bits``); without it, int32 is assumed."""

from __future__ import annotations

import torch

from dsf_runtime.formats import TensorSpec, register_format
from dsf_runtime.formats.values import check_value_tensors, decode_values, encode_values, value_specs

INT16_MAX_COLS = 1 << 15


def index_dtype_for(cols: int) -> torch.dtype:
    return torch.int16 if cols <= INT16_MAX_COLS else torch.int32


def csr_from_dense(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(crow int64 (rows+1), col int64 (nnz), values (nnz)) of a dense matrix, row-major."""
    nonzero = dense != 0
    crow = torch.zeros(dense.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(nonzero.sum(dim=1), dim=0, out=crow[1:])
    col = nonzero.nonzero(as_tuple=True)[1]
    return crow, col, dense[nonzero]


def check_offsets(crow: torch.Tensor, rows: int, nnz: int, what: str = "crow_indices") -> torch.Tensor:
    """Validate row offsets; return them as int64."""
    if crow.numel() != rows + 1:
        raise ValueError(f"{what} has {crow.numel()} entries, expected {rows + 1}")
    crow64 = crow.long()
    if int(crow64[0]) != 0 or int(crow64[-1]) != nnz:
        raise ValueError(f"{what} must start at 0 and end at nnz={nnz}")
    if rows and bool((crow64.diff() < 0).any()):
        raise ValueError(f"{what} are not monotone")
    return crow64


def check_columns(crow64: torch.Tensor, col: torch.Tensor, cols: int, what: str = "row") -> None:
    """Column indices in [0, cols) and strictly increasing within each (block) row."""
    if not col.numel():
        return
    col64 = col.long()
    if int(col64.min()) < 0 or int(col64.max()) >= cols:
        raise ValueError(f"col_indices out of range [0, {cols})")
    row = torch.repeat_interleave(torch.arange(crow64.numel() - 1), crow64.diff())
    if bool(((row * cols + col64).diff() <= 0).any()):
        raise ValueError(f"col_indices are not strictly increasing within a {what}")


@register_format
class CSRFormat:
    name = "csr"

    def specs(
        self, shape: tuple[int, int], nnz: int, value_dtype: torch.dtype, extra: dict | None = None
    ) -> dict[str, TensorSpec]:
        rows, _ = shape
        bits = int((extra or {}).get("index_bits", 32))
        if bits not in (16, 32):
            raise ValueError(f"index_bits must be 16 or 32, got {bits}")
        return {
            "crow_indices": TensorSpec((rows + 1,), torch.int32),
            "col_indices": TensorSpec((nnz,), torch.int16 if bits == 16 else torch.int32),
            **value_specs(rows, nnz, value_dtype),
        }

    def pack(self, dense: torch.Tensor, value_dtype: torch.dtype, **options) -> dict[str, torch.Tensor]:
        dense = dense.detach().to("cpu")
        rows, cols = dense.shape
        if dense.numel() >= 2**31:
            raise ValueError(f"matrix {rows}x{cols} is too large for int32 CSR offsets")
        crow, col, values = csr_from_dense(dense)
        return {
            "crow_indices": crow.to(torch.int32),
            "col_indices": col.to(index_dtype_for(cols)),
            **encode_values(values, crow, value_dtype),
        }

    def extra(self, tensors: dict[str, torch.Tensor]) -> dict:
        return {"index_bits": 16 if tensors["col_indices"].dtype == torch.int16 else 32}

    def to_csr(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]):
        """(crow int32, col int32, values as numbers) for CSR kernels."""
        crow = tensors["crow_indices"]
        return crow, tensors["col_indices"].to(torch.int32), decode_values(tensors, crow)

    def unpack(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        crow = tensors["crow_indices"].long()
        col = tensors["col_indices"].long()
        values = decode_values(tensors, crow)
        rows, cols = shape
        row = torch.repeat_interleave(torch.arange(rows, device=crow.device), crow.diff())
        dense = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
        dense[row, col] = values
        return dense

    def validate(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int], nnz: int) -> None:
        rows, cols = shape
        crow, col, values = tensors["crow_indices"], tensors["col_indices"], tensors["values"]
        if col.numel() != nnz or values.numel() != nnz:
            raise ValueError(f"sizes col={col.numel()} values={values.numel()} do not match {nnz} nonzeros")
        check_columns(check_offsets(crow, rows, nnz), col, cols)
        check_value_tensors(tensors, rows)
