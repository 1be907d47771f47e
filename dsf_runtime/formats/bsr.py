"""BSR: blocked sparse rows. Nonzero blocks of block x block entries, stored densely.

    crow_indices int32 (block_rows + 1), col_indices int32 (nblocks),
    values (nblocks, block, block)

The matrix is padded to a multiple of the block size; padding stays zero and is
cropped on unpack. Blocks suit tensor-core and cuSPARSE BSR kernels; for DSF's
unstructured masks most blocks are partly empty, so BSR stores more than CSR
(``dsf info`` shows the bytes). The block size is written in the checkpoint."""

from __future__ import annotations

import torch

from dsf_runtime.formats import TensorSpec, register_format
from dsf_runtime.formats.csr import check_columns, check_offsets
from dsf_runtime.formats.values import check_value_tensors, encode_values, is_int8

DEFAULT_BLOCK = 16


def _blocks(n: int, block: int) -> int:
    return (n + block - 1) // block


def _refuse_int8(value_dtype: torch.dtype) -> None:
    if is_int8(value_dtype):
        raise ValueError("int8 values are stored by the bitmap and csr formats, not bsr")


@register_format
class BSRFormat:
    name = "bsr"

    def specs(
        self, shape: tuple[int, int], nnz: int, value_dtype: torch.dtype, extra: dict | None = None
    ) -> dict[str, TensorSpec]:
        _refuse_int8(value_dtype)
        extra = extra or {}
        block = int(extra.get("block", DEFAULT_BLOCK))
        nblocks = int(extra.get("nblocks", 0))
        return {
            "crow_indices": TensorSpec((_blocks(shape[0], block) + 1,), torch.int32),
            "col_indices": TensorSpec((nblocks,), torch.int32),
            "values": TensorSpec((nblocks, block, block), value_dtype),
        }

    def pack(
        self, dense: torch.Tensor, value_dtype: torch.dtype, block: int = DEFAULT_BLOCK, **options
    ) -> dict[str, torch.Tensor]:
        dense = dense.detach().to("cpu")
        rows, cols = dense.shape
        _refuse_int8(value_dtype)
        if block < 1:
            raise ValueError(f"BSR block size must be positive, got {block}")
        b = block
        br, bc = _blocks(rows, b), _blocks(cols, b)
        padded = torch.zeros(br * b, bc * b, dtype=dense.dtype)
        padded[:rows, :cols] = dense
        tiles = padded.reshape(br, b, bc, b).permute(0, 2, 1, 3)  # (br, bc, b, b)
        present = (tiles != 0).any(dim=(2, 3))  # (br, bc)
        crow = torch.zeros(br + 1, dtype=torch.int64)
        torch.cumsum(present.sum(dim=1), dim=0, out=crow[1:])
        col = present.nonzero(as_tuple=True)[1]
        return {
            "crow_indices": crow.to(torch.int32),
            "col_indices": col.to(torch.int32),
            "values": encode_values(tiles[present], crow, value_dtype)["values"].contiguous(),  # (nblocks, b, b)
        }

    def extra(self, tensors: dict[str, torch.Tensor]) -> dict:
        return {"block": int(tensors["values"].shape[-1]), "nblocks": int(tensors["col_indices"].numel())}

    def to_bsr(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]):
        return tensors["crow_indices"], tensors["col_indices"], tensors["values"]

    def padded_shape(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> tuple[int, int]:
        b = int(tensors["values"].shape[-1])
        return _blocks(shape[0], b) * b, _blocks(shape[1], b) * b

    def unpack(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        crow = tensors["crow_indices"].long()
        col = tensors["col_indices"].long()
        values = tensors["values"]
        b = values.shape[-1]
        br, bc = _blocks(shape[0], b), _blocks(shape[1], b)
        tiles = torch.zeros(br, bc, b, b, dtype=values.dtype, device=values.device)
        block_row = torch.repeat_interleave(torch.arange(br, device=crow.device), crow.diff())
        tiles[block_row, col] = values
        return tiles.permute(0, 2, 1, 3).reshape(br * b, bc * b)[: shape[0], : shape[1]].contiguous()

    def validate(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int], nnz: int) -> None:
        crow, col, values = tensors["crow_indices"], tensors["col_indices"], tensors["values"]
        if values.dim() != 3 or values.shape[1] != values.shape[2] or values.shape[1] < 1:
            raise ValueError(f"values must be (nblocks, block, block), got {tuple(values.shape)}")
        b = values.shape[-1]
        br, bc = _blocks(shape[0], b), _blocks(shape[1], b)
        nblocks = col.numel()
        if values.shape[0] != nblocks:
            raise ValueError(f"{values.shape[0]} value blocks for {nblocks} column indices")
        check_columns(check_offsets(crow, br, nblocks), col, bc, "block row")
        check_value_tensors(tensors, br * b)
        if int((values != 0).sum()) != nnz:
            raise ValueError(f"blocks hold {int((values != 0).sum())} nonzeros, metadata says {nnz}")
