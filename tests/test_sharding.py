"""Tensor-parallel cuts of a DSF layer: concatenated column parts and summed row parts
reproduce the whole layer (float64 reference), and the byte counts follow the scheme."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsf_runtime.linear import DSFLinear
from dsf_runtime.sharding import gather_parts, shard_bytes, shard_layer
from helpers import random_sparse


def _layer(out_f, in_f, rank, seed, value_dtype=torch.bfloat16):
    L = random_sparse(out_f, rank or in_f, 0.3, seed=seed)
    R = None if rank is None else random_sparse(rank, in_f, 0.3, seed=seed + 1)
    layer = DSFLinear.from_factors(L, R, None, value_dtype=value_dtype)
    layer.set_backend("dense-ref")
    return layer


def _bounds(size, world):
    step = size // world
    return [(t * step, size if t == world - 1 else (t + 1) * step) for t in range(world)]


@settings(max_examples=25, deadline=None)
@given(
    out_f=st.integers(2, 90),
    in_f=st.integers(2, 300),
    rank=st.one_of(st.none(), st.integers(1, 80)),
    world=st.integers(1, 4),
    value_dtype=st.sampled_from([torch.bfloat16, torch.int8]),
    seed=st.integers(0, 1000),
)
def test_parts_reproduce_the_layer(out_f, in_f, rank, world, value_dtype, seed):
    world = min(world, out_f, in_f)
    layer = _layer(out_f, in_f, rank, seed, value_dtype)
    x = torch.randn(3, in_f, dtype=torch.float64)
    want = x @ layer.to_dense_weight().double().T
    cols = [shard_layer(layer, "column", a, b) for a, b in _bounds(out_f, world)]
    got = torch.cat([(x.float() @ p.to_dense_weight().T).double() for p in cols], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    rows = [(shard_layer(layer, "row", a, b), a, b) for a, b in _bounds(in_f, world)]
    got = sum((x[:, a:b].float() @ p.to_dense_weight().T).double() for p, a, b in rows)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # each part runs through its backend like any layer
    part = rows[0][0]
    torch.testing.assert_close(
        part(x[:, rows[0][1] : rows[0][2]].float()).double(),
        x[:, rows[0][1] : rows[0][2]] @ part.to_dense_weight().double().T,
        rtol=1e-4,
        atol=1e-4,
    )


def test_bytes_per_rank_follow_the_scheme():
    layer = _layer(64, 96, 48, 0)
    left, right = layer.L.nbytes(), layer.R.nbytes()
    assert shard_bytes(layer, "column", 2) == left / 2 + right
    assert shard_bytes(layer, "row", 2) == left + right / 2
    assert shard_bytes(layer, "none", 2) == left + right
    single = _layer(64, 96, None, 0)
    assert shard_bytes(single, "row", 4) == single.L.nbytes() / 4
    a = shard_layer(layer, "column", 0, 32)
    assert a.R is layer.R and a.out_features == 32 and a.in_features == 96


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="unknown split"):
        shard_layer(_layer(8, 8, 4, 0), "diagonal", 0, 4)


@settings(max_examples=20, deadline=None)
@given(
    out_f=st.integers(2, 90),
    in_f=st.integers(2, 120),
    rank=st.integers(1, 16).map(lambda k: 4 * k),
    world=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 1000),
)
def test_gather_parts_reproduce_the_layer(out_f, in_f, rank, world, seed):
    """Each rank's block of h, gathered, then each rank's rows of L: the whole output."""
    world = min(world, out_f)
    layer = _layer(out_f, in_f, rank, seed)
    x = torch.randn(3, in_f, dtype=torch.float64)
    want = x @ layer.to_dense_weight().double().T
    blocks = [(t * rank // world, (t + 1) * rank // world) for t in range(world)]
    parts = [gather_parts(layer, rows, ranks) for rows, ranks in zip(_bounds(out_f, world), blocks)]
    h = torch.cat([(x.float() @ r.to_dense_weight().T) for r, _ in parts], dim=1)  # the all-gather
    got = torch.cat([(h @ left.to_dense_weight().T).double() for _, left in parts], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert shard_bytes(layer, "gather", world) == pytest.approx((layer.L.nbytes() + layer.R.nbytes()) / world)
