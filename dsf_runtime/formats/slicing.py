"""Row and column blocks of a stored sparse matrix, cut without going through dense.

Tensor parallelism cuts each rank's part of a factor at load time (the checkpoint stays
one file set): a block of rows for an output split, a block of columns for an input
split. Both row-major formats keep their stored values bit for bit (int8 values keep
their row scales), so a cut matrix computes exactly what the same rows or columns of
the whole one do.
"""

from __future__ import annotations

import torch

from dsf_runtime.formats.bitmap import bits_to_mask, mask_to_bits
from dsf_runtime.formats.csr import index_dtype_for

SLICEABLE = ("bitmap", "csr")
_CHUNK_ROWS = 512  # rows unpacked to a mask at a time when cutting columns (bounded memory)


def _check(fmt: str, start: int, stop: int, size: int, what: str) -> None:
    if fmt not in SLICEABLE:
        raise ValueError(f"the {fmt!r} format cannot be cut into {what}; formats that can: {', '.join(SLICEABLE)}")
    if not 0 <= start <= stop <= size:
        raise ValueError(f"{what} {start}:{stop} outside 0:{size}")


def _offsets_name(fmt: str) -> str:
    return "row_offsets" if fmt == "bitmap" else "crow_indices"


def slice_rows(fmt: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int], start: int, stop: int):
    """Rows start..stop-1 of the matrix: (tensors, shape). Views where the layout allows."""
    rows, cols = shape
    _check(fmt, start, stop, rows, "rows")
    name = _offsets_name(fmt)
    offsets = tensors[name]
    first, last = int(offsets[start]), int(offsets[stop])
    out = {name: (offsets[start : stop + 1] - first).to(offsets.dtype), "values": tensors["values"][first:last]}
    if fmt == "bitmap":
        out["bitmap"] = tensors["bitmap"][start:stop]
    else:
        out["col_indices"] = tensors["col_indices"][first:last]
    if "scales" in tensors:
        out["scales"] = tensors["scales"][start:stop]
    return out, (stop - start, cols)


def slice_cols(fmt: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int], start: int, stop: int):
    """Columns start..stop-1 of the matrix: (tensors, shape); each row keeps its values
    in column order, so values and row scales are carried over unchanged."""
    rows, cols = shape
    _check(fmt, start, stop, cols, "columns")
    name = _offsets_name(fmt)
    offsets = tensors[name].long()
    values, kept_values, counts, kept_index = tensors["values"], [], [], []
    for r0 in range(0, rows, _CHUNK_ROWS):
        r1 = min(rows, r0 + _CHUNK_ROWS)
        a, b = int(offsets[r0]), int(offsets[r1])
        if fmt == "bitmap":
            mask = bits_to_mask(tensors["bitmap"][r0:r1], cols)  # (chunk, cols) bool
            col = mask.nonzero(as_tuple=True)[1]  # column of each stored value, row-major
            keep = mask[:, start:stop]
            kept_index.append(mask_to_bits(keep))
            counts.append(keep.sum(dim=1))
        else:
            col = tensors["col_indices"][a:b].long()
            row = torch.repeat_interleave(torch.arange(r1 - r0), offsets[r0 : r1 + 1].diff())
            inside = (col >= start) & (col < stop)
            kept_index.append(col[inside] - start)
            counts.append(torch.bincount(row[inside], minlength=r1 - r0))
        kept_values.append(values[a:b][(col >= start) & (col < stop)])
    new_offsets = torch.zeros(rows + 1, dtype=torch.int64)
    if rows:
        torch.cumsum(torch.cat(counts), 0, out=new_offsets[1:])
    out = {name: new_offsets.to(tensors[name].dtype), "values": torch.cat(kept_values) if rows else values[:0]}
    if fmt == "bitmap":
        words = (stop - start + 31) // 32
        out["bitmap"] = torch.cat(kept_index) if rows else torch.zeros(0, words, dtype=torch.int32)
    else:
        index = torch.cat(kept_index) if rows else torch.zeros(0, dtype=torch.int64)
        out["col_indices"] = index.to(index_dtype_for(stop - start))
    if "scales" in tensors:
        out["scales"] = tensors["scales"]
    return out, (rows, stop - start)
