"""CSR: row offsets (int32, rows + 1), column indices (int32, nnz), values (nnz)."""

from __future__ import annotations

import torch

from dsf_runtime.formats import TensorSpec, register_format


@register_format
class CSRFormat:
    name = "csr"
    index_dtype = torch.int32

    def specs(self, shape: tuple[int, int], nnz: int, value_dtype: torch.dtype) -> dict[str, TensorSpec]:
        rows, _ = shape
        return {
            "crow_indices": TensorSpec((rows + 1,), self.index_dtype),
            "col_indices": TensorSpec((nnz,), self.index_dtype),
            "values": TensorSpec((nnz,), value_dtype),
        }

    def pack(self, dense: torch.Tensor, value_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        dense = dense.detach().to("cpu")
        rows, cols = dense.shape
        if cols >= 2**31 or dense.numel() >= 2**31:
            raise ValueError(f"matrix {rows}x{cols} is too large for int32 CSR indices")
        nonzero = dense != 0
        counts = nonzero.sum(dim=1)
        crow = torch.zeros(rows + 1, dtype=torch.int64)
        torch.cumsum(counts, dim=0, out=crow[1:])
        col = nonzero.nonzero(as_tuple=True)[1]  # row-major order, columns ascending
        return {
            "crow_indices": crow.to(self.index_dtype),
            "col_indices": col.to(self.index_dtype),
            "values": dense[nonzero].to(value_dtype),
        }

    def unpack(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        crow = tensors["crow_indices"].long()
        col = tensors["col_indices"].long()
        values = tensors["values"]
        rows, cols = shape
        row = torch.repeat_interleave(torch.arange(rows, device=crow.device), crow.diff())
        dense = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
        dense[row, col] = values
        return dense

    def validate(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int], nnz: int) -> None:
        rows, cols = shape
        crow, col, values = tensors["crow_indices"], tensors["col_indices"], tensors["values"]
        if crow.numel() != rows + 1 or col.numel() != nnz or values.numel() != nnz:
            raise ValueError(
                f"sizes crow={crow.numel()} col={col.numel()} values={values.numel()} "
                f"do not match {rows} rows and {nnz} nonzeros"
            )
        crow64 = crow.long()
        if int(crow64[0]) != 0 or int(crow64[-1]) != nnz:
            raise ValueError(f"crow_indices must start at 0 and end at nnz={nnz}")
        if rows and bool((crow64.diff() < 0).any()):
            raise ValueError("crow_indices are not monotone")
        if nnz:
            if int(col.min()) < 0 or int(col.max()) >= cols:
                raise ValueError(f"col_indices out of range [0, {cols})")
            row = torch.repeat_interleave(torch.arange(rows), crow64.diff())
            key = row * cols + col.long()
            if bool((key.diff() <= 0).any()):
                raise ValueError("col_indices are not strictly increasing within a row")
            if not bool(torch.isfinite(values).all()):
                raise ValueError("values contain NaN or Inf")
