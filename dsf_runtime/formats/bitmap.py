"""Bitmap: one bit per matrix entry plus the nonzero values packed row by row.

    bitmap       int32 (rows, ceil(cols / 32)): bit j of word w marks column 32 w + j
    row_offsets  int32 (rows + 1): index of each row's first value (for row-parallel
                 kernels; a kernel also finds a value by popcount within the row)
    values       (nnz,) in row-major order

At DSF's 50% total density the two factors' bitmaps cost 2 bits per dense weight and
the fp16 values 1 byte, i.e. 1.25 bytes per dense weight instead of 2 for bf16.
This is the compact default storage format; it is also the layout CPU kernels that
expand values by popcount (SparAMX-style) stream."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsf_runtime.formats import TensorSpec, register_format
from dsf_runtime.formats.csr import check_offsets, csr_from_dense
from dsf_runtime.formats.values import check_value_tensors, decode_values, encode_values, value_specs

# A faster structural check (one native pass) that a kernel library registers once it is
# built: (bitmap, row_offsets, cols, nnz) -> None if the checks hold, the problem as text,
# or False to fall back to the torch checks. Formats import nothing of the kernels.
_NATIVE_CHECK: Callable[[torch.Tensor, torch.Tensor, int, int], str | None | bool] | None = None


def set_native_check(check: Callable[[torch.Tensor, torch.Tensor, int, int], str | None | bool] | None) -> None:
    global _NATIVE_CHECK
    _NATIVE_CHECK = check


WORD = 32
_SHIFTS = torch.arange(WORD, dtype=torch.int64)


def word_popcounts(bitmap: torch.Tensor) -> torch.Tensor:
    """Set bits of each word of an int32 (rows, words) bitmap, as int32 (rows, words):
    the SWAR popcount in int32 arithmetic (two's-complement wrap-around is harmless:
    every step masks what it keeps), no per-bit or per-byte temporaries."""
    v = bitmap.contiguous()
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return ((v * 0x01010101) >> 24) & 0x3F  # the top byte holds the word's count (0..32)


def row_popcounts(bitmap: torch.Tensor) -> torch.Tensor:
    """Set bits per row of an int32 (rows, words) bitmap, int64 (rows,); loading
    validates every factor with it where the native check is not built."""
    return word_popcounts(bitmap).sum(dim=1, dtype=torch.int64)


def _words(cols: int) -> int:
    return (cols + WORD - 1) // WORD


def bits_to_mask(bitmap: torch.Tensor, cols: int) -> torch.Tensor:
    """(rows, words) int32 -> (rows, cols) bool."""
    bits = (bitmap.long().unsqueeze(-1) >> _SHIFTS.to(bitmap.device)) & 1  # (rows, words, 32)
    return bits.reshape(bitmap.shape[0], bitmap.shape[1] * WORD)[:, :cols].bool()


def mask_to_bits(mask: torch.Tensor) -> torch.Tensor:
    """(rows, cols) bool -> (rows, words) int32 (two's complement for bit 31)."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, _words(cols) * WORD, dtype=torch.int64)
    padded[:, :cols] = mask.long()
    words = (padded.reshape(rows, _words(cols), WORD) << _SHIFTS).sum(dim=-1)  # < 2^32
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


@register_format
class BitmapFormat:
    name = "bitmap"

    def specs(
        self, shape: tuple[int, int], nnz: int, value_dtype: torch.dtype, extra: dict | None = None
    ) -> dict[str, TensorSpec]:
        rows, cols = shape
        return {
            "bitmap": TensorSpec((rows, _words(cols)), torch.int32),
            "row_offsets": TensorSpec((rows + 1,), torch.int32),
            **value_specs(rows, nnz, value_dtype),
        }

    def pack(self, dense: torch.Tensor, value_dtype: torch.dtype, **options) -> dict[str, torch.Tensor]:
        dense = dense.detach().to("cpu")
        if dense.numel() >= 2**31:
            raise ValueError(f"matrix {tuple(dense.shape)} is too large for int32 offsets")
        crow, _, values = csr_from_dense(dense)
        return {
            "bitmap": mask_to_bits(dense != 0),
            "row_offsets": crow.to(torch.int32),
            **encode_values(values, crow, value_dtype),
        }

    def extra(self, tensors: dict[str, torch.Tensor]) -> dict:
        return {}

    def to_csr(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]):
        mask = bits_to_mask(tensors["bitmap"], shape[1])
        col = mask.nonzero(as_tuple=True)[1].to(torch.int32)
        return tensors["row_offsets"], col, decode_values(tensors, tensors["row_offsets"])

    def unpack(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        mask = bits_to_mask(tensors["bitmap"], shape[1])
        values = decode_values(tensors, tensors["row_offsets"])
        dense = torch.zeros(shape, dtype=values.dtype, device=values.device)
        dense[mask] = values
        return dense

    def validate(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int], nnz: int) -> None:
        rows, cols = shape
        bitmap, offsets, values = tensors["bitmap"], tensors["row_offsets"], tensors["values"]
        if tuple(bitmap.shape) != (rows, _words(cols)):
            raise ValueError(f"bitmap has shape {tuple(bitmap.shape)}, expected {(rows, _words(cols))}")
        if values.numel() != nnz:
            raise ValueError(f"values has {values.numel()} entries, expected {nnz}")
        if offsets.numel() != rows + 1:
            raise ValueError(f"row_offsets has {offsets.numel()} entries, expected {rows + 1}")
        problem = False if _NATIVE_CHECK is None else _NATIVE_CHECK(bitmap, offsets, cols, nnz)
        if problem is False:
            self._check_structure_torch(bitmap, offsets, rows, cols, nnz)
        elif problem is not None:
            raise ValueError(problem)
        check_value_tensors(tensors, rows)

    @staticmethod
    def _check_structure_torch(bitmap: torch.Tensor, offsets: torch.Tensor, rows: int, cols: int, nnz: int) -> None:
        """The same checks as the native pass, in torch (where the kernel is not built)."""
        offsets64 = check_offsets(offsets, rows, nnz, "row_offsets")
        if cols % WORD and rows:
            last = bitmap[:, -1].long() & 0xFFFFFFFF
            if bool((last >> (cols % WORD)).any()):
                raise ValueError("bitmap has bits set beyond the last column")
        if not torch.equal(row_popcounts(bitmap), offsets64.diff()):
            raise ValueError("bitmap popcounts do not match row_offsets")
