"""Row and column cuts of stored matrices equal the same cut of the dense matrix, exactly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsf_runtime.formats import get_format
from dsf_runtime.formats.slicing import SLICEABLE, slice_cols, slice_rows
from helpers import random_sparse


@st.composite
def cuts(draw):
    rows, cols = draw(st.integers(0, 70)), draw(st.integers(1, 1100))
    axis_size = draw(st.sampled_from(["rows", "cols"]))
    size = rows if axis_size == "rows" else cols
    start = draw(st.integers(0, size))
    stop = draw(st.integers(start, size))
    density = draw(st.sampled_from([0.0, 0.01, 0.3, 0.9, 1.0]))
    return rows, cols, axis_size, start, stop, density, draw(st.integers(0, 2**16))


@pytest.mark.parametrize("name", SLICEABLE)
@pytest.mark.parametrize("value_dtype", [torch.bfloat16, torch.int8])
@settings(max_examples=40, deadline=None)
@given(case=cuts())
def test_cut_equals_dense_cut(name, value_dtype, case):
    rows, cols, axis, start, stop, density, seed = case
    fmt = get_format(name)
    dense = random_sparse(rows, cols, density, seed=seed, empty_rows=min(2, rows))
    tensors = fmt.pack(dense, value_dtype)
    whole = fmt.unpack(tensors, (rows, cols))
    cut = slice_rows if axis == "rows" else slice_cols
    part, shape = cut(name, tensors, (rows, cols), start, stop)
    want = whole[start:stop] if axis == "rows" else whole[:, start:stop]
    assert shape == tuple(want.shape)
    mask = dense != 0  # what is stored (an int8 value may round to 0 and still be stored)
    nnz = int((mask[start:stop] if axis == "rows" else mask[:, start:stop]).sum())
    specs = fmt.specs(shape, nnz, value_dtype, fmt.extra(part))
    assert set(part) == set(specs)
    for key, spec in specs.items():
        assert tuple(part[key].shape) == spec.shape and part[key].dtype == spec.dtype, key
    fmt.validate(part, shape, nnz)
    assert torch.equal(fmt.unpack(part, shape), want)  # int8 too: values and row scales carried over


def test_unsliceable_format_and_bad_range_are_refused():
    dense = random_sparse(8, 8, 0.5)
    bsr = get_format("bsr").pack(dense, torch.float32)
    with pytest.raises(ValueError, match="bsr.*cannot be cut.*bitmap, csr"):
        slice_rows("bsr", bsr, (8, 8), 0, 4)
    bitmap = get_format("bitmap").pack(dense, torch.float32)
    with pytest.raises(ValueError, match="outside 0:8"):
        slice_cols("bitmap", bitmap, (8, 8), 4, 9)
