"""Contract tests run over every registered format: exact round trips and validation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from dsf_runtime.errors import ConfigError
from dsf_runtime.formats import FORMATS, get_format, tensors_nbytes
from helpers import random_sparse

SHAPES = [(830, 545), (1, 1), (7, 300), (300, 7), (64, 64)]
DENSITIES = [0.0, 0.01, 0.16, 0.5, 0.9, 1.0]


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", DENSITIES)
def test_round_trip_exact(name, shape, density):
    fmt = get_format(name)
    dense = random_sparse(*shape, density, empty_rows=min(3, shape[0] // 2)).half()
    tensors = fmt.pack(dense, torch.float16)
    nnz = int((dense != 0).sum())
    specs = fmt.specs(shape, nnz, torch.float16, fmt.extra(tensors))
    assert set(tensors) == set(specs)
    for key, spec in specs.items():
        assert tuple(tensors[key].shape) == spec.shape and tensors[key].dtype == spec.dtype, key
    fmt.validate(tensors, shape, nnz)
    assert torch.equal(fmt.unpack(tensors, shape), dense)
    assert tensors_nbytes(tensors) > 0


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_empty_matrix(name):
    fmt = get_format(name)
    dense = torch.zeros(0, 5)
    tensors = fmt.pack(dense, torch.float32)
    fmt.validate(tensors, (0, 5), 0)
    assert fmt.unpack(tensors, (0, 5)).shape == (0, 5)


def _corruptions():
    def bump_col(t):
        t["col_indices"][0] = 10_000

    def negative_col(t):
        t["col_indices"][-1] = -1

    def non_monotone(t):
        t["crow_indices"][5] = t["crow_indices"][6] + 1

    def bad_end(t):
        t["crow_indices"][-1] -= 1

    def nan_value(t):
        t["values"][3] = float("nan")

    def unsorted_cols(t):
        start = int(t["crow_indices"][2])
        t["col_indices"][start], t["col_indices"][start + 1] = (
            int(t["col_indices"][start + 1]),
            int(t["col_indices"][start]),
        )

    def short_values(t):
        t["values"] = t["values"][:-1]

    return {
        "col out of range": (bump_col, "out of range"),
        "negative col": (negative_col, "out of range"),
        "offsets not monotone": (non_monotone, "monotone"),
        "offsets end wrong": (bad_end, "end at nnz"),
        "NaN value": (nan_value, "NaN"),
        "unsorted columns": (unsorted_cols, "increasing"),
        "values too short": (short_values, "sizes"),
    }


def test_csr_uses_int16_indices_when_they_fit():
    fmt = get_format("csr")
    assert fmt.pack(torch.eye(300), torch.float16)["col_indices"].dtype == torch.int16
    assert fmt.extra(fmt.pack(torch.eye(3), torch.float16)) == {"index_bits": 16}
    wide = torch.zeros(2, 40000)
    wide[1, 39999] = 1.0
    tensors = fmt.pack(wide, torch.float16)
    assert tensors["col_indices"].dtype == torch.int32
    assert torch.equal(fmt.unpack(tensors, (2, 40000)), wide.half())


def test_bitmap_bytes_match_the_design_budget():
    """4096x4096 DSF pair at 50%: 1 bit per factor entry + fp16 values ~ 1.25 B/weight."""
    fmt = get_format("bitmap")
    n = 512  # same ratios at a smaller size
    square = random_sparse(n, n, 0.16, seed=1)
    other = random_sparse(n, n, 0.34, seed=2)
    total = sum(tensors_nbytes(fmt.pack(m, torch.float16)) for m in (square, other))
    per_weight = total / (n * n)
    assert per_weight == pytest.approx(0.25 + 2 * 0.5, abs=0.02)


@pytest.mark.parametrize("block", [4, 16, 32])
def test_bsr_block_sizes(block):
    fmt = get_format("bsr")
    dense = random_sparse(70, 45, 0.3, seed=block)
    tensors = fmt.pack(dense, torch.float32, block=block)
    assert fmt.extra(tensors) == {"block": block, "nblocks": tensors["col_indices"].numel()}
    fmt.validate(tensors, (70, 45), int((dense != 0).sum()))
    assert torch.equal(fmt.unpack(tensors, (70, 45)), dense)


def _bitmap_corruptions():
    def extra_bit(t):
        t["bitmap"][0, -1] |= 1 << 30  # beyond column 45 of 64 bits

    def drop_bit(t):
        t["bitmap"][3, 0] &= ~1

    def offsets(t):
        t["row_offsets"][2] += 1

    def nan(t):
        t["values"][0] = float("inf")

    def backwards(t):
        t["row_offsets"][5] = t["row_offsets"][6] + 1

    def first_offset(t):
        t["row_offsets"][0] = 1

    def last_offset(t):
        t["row_offsets"][-1] -= 1

    return {
        "bit past last column": (extra_bit, "beyond"),
        "popcount mismatch": (drop_bit, "popcounts"),
        "offsets": (offsets, "popcounts|monotone"),
        "inf": (nan, "NaN or Inf"),
        "offsets backwards": (backwards, "monotone"),
        "first offset": (first_offset, "start at 0"),
        "last offset": (last_offset, "end at nnz"),
    }


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("case", sorted(_bitmap_corruptions()))
def test_bitmap_validate_rejects_corruption(case, native, monkeypatch):
    """Both the kernel library's one-pass check and the torch checks refuse every case."""
    import dsf_runtime.kernels.cpu_bitmap as kernel

    if native and kernel.build() is None:
        pytest.skip("CPU kernel library not built here")
    if not native:
        monkeypatch.setattr(kernel, "check_bitmap", lambda *args: False)
    corrupt, message = _bitmap_corruptions()[case]
    fmt = get_format("bitmap")
    dense = random_sparse(40, 45, 0.5, seed=1)
    dense[3, 0] = 1.0
    tensors = {k: v.clone() for k, v in fmt.pack(dense, torch.float32).items()}
    corrupt(tensors)
    with pytest.raises(ValueError, match=message):
        fmt.validate(tensors, (40, 45), int((dense != 0).sum()))


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (1, 1), (830, 545), (64, 64)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_bitmap_native_check_accepts_valid_factors(shape, density):
    from dsf_runtime.kernels.cpu_bitmap import build, check_bitmap

    if not build():
        pytest.skip("CPU kernel library not built here")
    dense = random_sparse(*shape, density) if shape[0] and shape[1] else torch.zeros(shape)
    t = get_format("bitmap").pack(dense, torch.float16)
    assert check_bitmap(t["bitmap"], t["row_offsets"], shape[1], int((dense != 0).sum())) is None


@pytest.mark.parametrize("case", sorted(_corruptions()))
def test_csr_validate_rejects_corruption(case):
    corrupt, message = _corruptions()[case]
    fmt = get_format("csr")
    dense = random_sparse(40, 30, 0.5, seed=1)
    dense[2, :4] = 1.0  # row 2 has at least two entries for the swap
    tensors = {k: v.clone() for k, v in fmt.pack(dense, torch.float32).items()}
    nnz = int((dense != 0).sum())
    corrupt(tensors)
    with pytest.raises(ValueError, match=message):
        fmt.validate(tensors, (40, 30), nnz)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=6), min_size=1, max_size=6))
def test_row_popcounts_count_every_bit(rows):
    from dsf_runtime.formats.bitmap import row_popcounts

    width = max(len(r) for r in rows)
    words = [r + [0] * (width - len(r)) for r in rows]
    expected = [sum(bin(w & 0xFFFFFFFF).count("1") for w in r) for r in words]
    assert row_popcounts(torch.tensor(words, dtype=torch.int32)).tolist() == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_all_finite_finds_one_bad_value(dtype, bad):
    from dsf_runtime.formats import all_finite

    t = torch.randn(33, 17).to(dtype)
    assert all_finite(t) and all_finite(torch.empty(0, dtype=dtype))
    t[20, 5] = bad
    assert not all_finite(t)


INT8_FORMATS = ["bitmap", "csr"]


@pytest.mark.parametrize("name", INT8_FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", DENSITIES)
def test_int8_values_round_trip_within_half_a_step(name, shape, density):
    """int8 values with one scale per row: the mask is kept exactly, each value is off
    by at most half its row's step (max |row| / 127 / 2), and the row maximum is exact."""
    fmt = get_format(name)
    dense = random_sparse(*shape, density, empty_rows=min(3, shape[0] // 2))
    tensors = fmt.pack(dense, torch.int8)
    nnz = int((dense != 0).sum())
    specs = fmt.specs(shape, nnz, torch.int8, fmt.extra(tensors))
    assert set(tensors) == set(specs) and "scales" in specs
    for key, spec in specs.items():
        assert tuple(tensors[key].shape) == spec.shape and tensors[key].dtype == spec.dtype, key
    fmt.validate(tensors, shape, nnz)
    back = fmt.unpack(tensors, shape)
    step = dense.abs().amax(dim=1, keepdim=True) / 127
    assert bool(((back - dense).abs() <= step / 2 + 1e-7).all())
    assert not bool(((back != 0) & (dense == 0)).any())  # no value appears where the mask has none
    # (a tiny value may round to 0 but stays stored: values.numel() == nnz, checked by the specs)
    assert torch.allclose(back.abs().amax(dim=1), dense.abs().amax(dim=1), rtol=1e-6)
    assert tensors_nbytes({"values": tensors["values"]}) == nnz  # one byte per nonzero


def test_int8_bytes_at_dsf_density():
    """A 50% DSF pair of a square layer: ~0.75 bytes per dense weight (bitmap + int8),
    i.e. under 0.4x dense bf16, against ~1.25 with fp16 values."""
    fmt = get_format("bitmap")
    square = random_sparse(512, 512, 0.16, seed=1)
    other = random_sparse(512, 512, 0.34, seed=2)
    total = sum(tensors_nbytes(fmt.pack(m, torch.int8)) for m in (square, other))
    assert total / (2 * 512 * 512) < 0.4


@pytest.mark.parametrize("name", INT8_FORMATS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_int8_bad_scales_are_refused(name, bad):
    fmt = get_format(name)
    dense = random_sparse(40, 30, 0.5)
    tensors = fmt.pack(dense, torch.int8)
    tensors["scales"][3] = bad
    with pytest.raises(ValueError, match="scales"):
        fmt.validate(tensors, (40, 30), int((dense != 0).sum()))


def test_bsr_refuses_int8_values():
    with pytest.raises(ValueError, match="int8"):
        get_format("bsr").pack(torch.eye(4), torch.int8)


@pytest.mark.parametrize("name", ["bitmap", "csr", "bsr"])
def test_values_past_float16_are_refused_not_stored_as_inf(name):
    """A factor value over float16's 65504 (legal in a factor pair: L scaled up, R down)
    is a clear error naming the way out, not an inf in the checkpoint; bfloat16, the
    default, keeps it."""
    m = torch.zeros(16, 32)
    m[3, 5], m[7, 1] = 7.0e4, -2.0
    with pytest.raises(ConfigError, match="does not fit float16.*bfloat16 or float32"):
        get_format(name).pack(m, torch.float16)
    tensors = get_format(name).pack(m, torch.bfloat16)
    back = get_format(name).unpack(tensors, (16, 32)).float()
    assert float(back[3, 5]) == pytest.approx(7.0e4, rel=2**-8) and float(back[7, 1]) == -2.0
