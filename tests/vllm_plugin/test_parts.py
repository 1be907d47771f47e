"""The vLLM linear method's pure parts (no vLLM needed): which checkpoint modules back a
vLLM layer, which block a rank holds, and the checks on the tensors vLLM hands over."""

from __future__ import annotations

import pytest
import torch

from dsf_runtime.checkpoint import DSFQuantConfig, ModuleEntry
from dsf_runtime.errors import CheckpointError
from dsf_runtime.linear import DSFLinear
from dsf_runtime.vllm_plugin.parts import assemble, column_bounds, gathers, module_names, rank_part, split_of
from helpers import random_sparse

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def _entry(**kw):
    return ModuleEntry(**{"out_features": 48, "in_features": 40, "rank": 32, "nnz_left": 1, "nnz_right": 1, **kw})


def test_module_names_follow_vllm_merging():
    mods = {f"m.l.0.attn.{p}": _entry() for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert module_names("m.l.0.attn.qkv_proj", PACKED, mods) == [
        f"m.l.0.attn.{p}" for p in ("q_proj", "k_proj", "v_proj")
    ]
    assert module_names("m.l.0.attn.o_proj", PACKED, mods) == ["m.l.0.attn.o_proj"]
    assert module_names("m.l.0.mlp.gate_up_proj", PACKED, mods) is None  # not compressed: vLLM's own
    del mods["m.l.0.attn.k_proj"]
    with pytest.raises(CheckpointError, match="m.l.0.attn.k_proj is not compressed"):
        module_names("m.l.0.attn.qkv_proj", PACKED, mods)


def test_split_of():
    assert split_of([64], 128, 40, 40) == "column"
    assert split_of([128], 128, 20, 40) == "row"
    assert split_of([128], 128, 40, 40) == "none"


@pytest.mark.parametrize(
    "total, size, world, want",
    [
        (128, 64, 2, [(0, 64), (64, 128)]),
        (128, 128, 1, [(0, 128)]),
        (64, 64, 2, [(0, 64), (0, 64)]),  # one K/V head group, two ranks: both hold it
        (128, 64, 4, [(0, 64), (0, 64), (64, 128), (64, 128)]),
    ],
)
def test_column_bounds(total, size, world, want):
    assert [column_bounds(total, size, r, world) for r in range(world)] == want


def test_column_bounds_refuses_uneven_cuts():
    with pytest.raises(CheckpointError, match="cannot cut 100 outputs"):
        column_bounds(100, 30, 0, 4)


def _stored(rank=32):
    layer = DSFLinear.from_factors(
        random_sparse(48, rank, 0.3, seed=1), random_sparse(rank, 40, 0.3, seed=2), None, value_dtype=torch.bfloat16
    )
    quant = DSFQuantConfig(
        sparsity=0.5,
        modules={"m": _entry(rank=rank, nnz_left=layer.L.nnz, nnz_right=layer.R.nnz)},
    )
    tensors = {f"{side}.{k}": v for side in ("L", "R") for k, v in getattr(layer, side).stored().items()}
    return layer, quant, tensors


def test_assemble_rebuilds_the_layer_and_cuts_a_rank_part():
    layer, quant, tensors = _stored()
    whole = assemble("m", quant.modules["m"], quant, tensors)
    assert torch.equal(whole.to_dense_weight(), layer.to_dense_weight())
    part = rank_part("m", quant.modules["m"], quant, tensors, "row", (8, 24))
    assert torch.equal(part.to_dense_weight(), layer.to_dense_weight()[:, 8:24])
    assert part.R.values.data_ptr() != tensors["R.values"].data_ptr()  # its own copy


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.pop("R.values"), "lacks m.R.values"),
        (lambda t: t.update({"R.extra": torch.zeros(1)}), "unexpected tensor m.R.extra"),
        (lambda t: t.update({"L.values": t["L.values"].float()}), "tensor m.L.values: stored torch.float32"),
        (lambda t: t["L.row_offsets"].__setitem__(2, t["L.row_offsets"][2] + 1), "m.L: .*row_offsets"),
        (lambda t: t["R.values"].__setitem__(0, float("nan")), "m.R: values contain NaN"),
    ],
)
def test_assemble_names_what_is_wrong(change, message):
    _, quant, tensors = _stored()
    tensors = {k: v.clone() for k, v in tensors.items()}
    change(tensors)
    with pytest.raises(CheckpointError, match=message):
        assemble("m", quant.modules["m"], quant, tensors)


def test_gather_cut_is_chosen_where_ranks_divide_evenly():
    assert gathers([_entry(rank=32), _entry(rank=16)], "column", 2)
    assert not gathers([_entry(rank=32), _entry(rank=15)], "column", 2)  # uneven: R stays whole
    assert not gathers([_entry(rank=None, nnz_right=0)], "column", 2)  # one matrix: no rank dimension
    assert not gathers([_entry(rank=32)], "row", 2) and not gathers([_entry(rank=32)], "column", 1)
    layer, quant, tensors = _stored()
    right, left = rank_part("m", quant.modules["m"], quant, tensors, "column", (0, 24), ranks=(16, 32))
    assert torch.equal(left.to_dense_weight(), layer.L.to_dense().float()[:24])  # rows of L, all of r
    assert torch.equal(right.to_dense_weight(), layer.R.to_dense().float()[16:32])  # a block of h = R x
