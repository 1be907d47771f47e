"""Tensor-parallel cuts of a DSF layer y = L (R x): what one rank holds and computes.

Serving engines split a linear two ways (docs/vllm.md has the reasoning and a byte table):

- ``column`` (output split: q/k/v, gate/up): the rank computes rows ``start:stop`` of
  y. It holds those rows of L and all of R: h = R x is computed on every rank (x is
  whole there), and no collective is added. Bytes per rank: nnz(L)/T + nnz(R).
- ``gather`` (the same output split, fewer bytes): the rank also holds only a block of
  R's rows (a block of the rank dimension), computes its block of h, and one
  all-gather of h (r values per token) gives every rank the whole h for its rows of L.
  Bytes per rank: (nnz(L) + nnz(R))/T, for one collective that the engine's column
  layers do not otherwise have (``gather_parts``).
- ``row`` (input split: o, down): the rank holds columns ``start:stop`` of R and all
  of L and computes the partial y_t = L (R_t x_t). The engine's own all-reduce of the
  layer output sums them to L (sum_t R_t x_t) = L R x, so no collective is added.
  Bytes per rank: nnz(R)/T + nnz(L).

A one-matrix layer (rank None) is cut like a dense weight: rows for ``column``,
columns for ``row``, 1/T of its bytes per rank.
"""

from __future__ import annotations

from typing import Literal

from dsf_runtime.formats.slicing import slice_cols, slice_rows
from dsf_runtime.linear import DSFLinear, SparseFactor

Split = Literal["none", "column", "row"]


def _cut(factor: SparseFactor, axis: str, start: int, stop: int) -> SparseFactor:
    cut = slice_rows if axis == "rows" else slice_cols
    tensors, shape = cut(factor.fmt, factor.stored(), factor.shape, start, stop)
    return SparseFactor.from_tensors(shape, factor.fmt, tensors, tensors["values"].numel())


def shard_layer(layer: DSFLinear, split: Split, start: int, stop: int) -> DSFLinear:
    """The part of ``layer`` that one rank holds for ``split`` (``start:stop`` are output
    rows for ``column``, input columns for ``row``); ``none`` returns the layer. The bias
    stays with the caller (engines add it once, after the reduction)."""
    if split == "none":
        return layer
    if split not in ("column", "row"):
        raise ValueError(f"unknown split {split!r}; known: none, column, row")
    out_features, in_features = layer.out_features, layer.in_features
    if split == "column":
        left, right = _cut(layer.L, "rows", start, stop), layer.R
        out_features = stop - start
    elif layer.R is None:
        left, right = _cut(layer.L, "cols", start, stop), None
        in_features = stop - start
    else:
        left, right = layer.L, _cut(layer.R, "cols", start, stop)
        in_features = stop - start
    part = DSFLinear(
        in_features,
        out_features,
        layer.rank,
        layer.fmt,
        left.nnz,
        0 if right is None else right.nnz,
        layer.L.values.dtype,
        bias=False,
    )
    part.L, part.R = left, right
    part.requested_backend = layer.requested_backend
    return part


def gather_parts(layer: DSFLinear, rows: tuple[int, int], ranks: tuple[int, int]) -> tuple[DSFLinear, DSFLinear]:
    """The ``gather`` cut: (h block, output block) as one-matrix layers, R's rows
    ``ranks`` (the rank's block of h = R x, (k, in)) and L's rows ``rows`` ((rows, r),
    applied to the whole h after the all-gather)."""
    if layer.R is None:
        raise ValueError("a one-matrix layer has no rank dimension to gather; cut it with 'column'")
    right, left = _cut(layer.R, "rows", *ranks), _cut(layer.L, "rows", *rows)
    parts = []
    for factor in (right, left):
        part = DSFLinear(factor.shape[1], factor.shape[0], None, layer.fmt, factor.nnz, 0, layer.L.values.dtype)
        part.L = factor
        part.requested_backend = layer.requested_backend
        parts.append(part)
    return parts[0], parts[1]


def shard_bytes(layer: DSFLinear, split: Split | Literal["gather"], world: int) -> float:
    """Stored bytes one rank holds under ``split`` with ``world`` ranks (an even cut):
    what docs/vllm.md's table counts."""
    left, right = layer.L.nbytes(), 0 if layer.R is None else layer.R.nbytes()
    if split == "none" or world == 1:
        return left + right
    if layer.R is None or split == "gather":
        return (left + right) / world
    return left / world + right if split == "column" else left + right / world
