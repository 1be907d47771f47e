"""The C++ bitmap kernel: both instruction paths, fp16 and bf16, odd shapes and batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsf_runtime.formats import get_format
from dsf_runtime.kernels import BACKENDS, choose_backend, cpu_bitmap
from dsf_runtime.linear import DSFLinear
from helpers import random_sparse

backend = BACKENDS["cpu-bitmap"]
pytestmark = pytest.mark.skipif(not backend.available(), reason="CPU kernel could not be built here")


# Named edge shapes (one row, one column, odd sizes, a 4096-wide row) and random ones;
# densities from empty to full; batches across every path's tile sizes and switches.
SHAPES = st.one_of(
    st.sampled_from([(830, 545), (1, 33), (64, 1), (37, 95), (300, 4096)]),
    st.tuples(st.integers(1, 160), st.integers(1, 1100)),
)
DENSITIES = st.one_of(st.sampled_from([0.0, 0.01, 0.15, 0.5, 0.9, 1.0]), st.floats(0.0, 1.0))
BATCHES = st.one_of(st.sampled_from([1, 2, 3, 4, 5, 9, 12, 16, 17, 40]), st.integers(1, 70))
VALUE_DTYPES = st.sampled_from([torch.float16, torch.bfloat16, torch.int8])
KERNEL_SETTINGS = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def _factor(shape, density, seed, value_dtype):
    tensors = get_format("bitmap").pack(random_sparse(*shape, density, seed=seed, empty_rows=2), value_dtype)
    return tensors, get_format("bitmap").unpack(tensors, shape)  # the stored numbers (int8: dequantized)


def _relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)) if ref.numel() else 0.0


@KERNEL_SETTINGS
@given(
    isa=st.sampled_from(["native", "avx2", "portable"]),
    value_dtype=VALUE_DTYPES,
    shape=SHAPES,
    density=DENSITIES,
    batch=BATCHES,
    seed=st.integers(0, 2**16),
)
def test_matches_dense(isa, value_dtype, shape, density, batch, seed):
    """Every instruction path, value kind, shape, density and batch: within 1e-5 of the float64 product."""
    if isa == "avx2" and not cpu_bitmap.has_path("avx2"):
        return  # this CPU has no AVX2 (the portable examples still run)
    with pytest.MonkeyPatch.context() as mp:
        if isa != "native":
            mp.setenv("DSF_CPU_ISA", isa)
        tensors, dense = _factor(shape, density, seed, value_dtype)
        p = backend.prepare("bitmap", tensors, shape, torch.float32)
        x = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(seed + 1))
        y = backend.matmul(p, x)
        rounds_x = backend.path_at(p, batch).startswith(("pairs", "tiles", "dot"))  # these take x in bf16
    assert y.shape == (batch, shape[0])
    assert _relative_error(y, (x.bfloat16() if rounds_x else x).double() @ dense.double().t()) < 1e-5


@pytest.mark.parametrize("batch", [2, 12, 33])
def test_word_and_nonzero_paths_agree_either_side_of_the_switch(monkeypatch, batch):
    """DSF_NZ_MIN_BATCH moves the word/nonzero switch; both paths give the dense product
    (x strided in memory too: the nonzero path lays x out itself)."""
    shape = (200, 1100)
    tensors = get_format("bitmap").pack(random_sparse(*shape, 0.3, seed=batch), torch.float16)
    dense = get_format("bitmap").unpack(tensors, shape).double()
    p = backend.prepare("bitmap", tensors, shape, torch.float32)
    x = torch.randn(shape[1], batch, generator=torch.Generator().manual_seed(1)).t()  # non-contiguous
    ys = []
    for switch in ("1", "1000"):
        monkeypatch.setenv("DSF_NZ_MIN_BATCH", switch)
        ys.append(backend.matmul(backend.refresh(p), x).double())
    ref = x.double() @ dense.t()
    for y in ys:
        assert float((y - ref).abs().max() / ref.abs().max()) < 1e-5


TILE_PATHS = [
    pytest.param(
        "amx-emulated",
        marks=pytest.mark.skipif(
            not cpu_bitmap.has_path("tiles-emulated"), reason="an x86 build has the emulated tiles"
        ),
    ),
    pytest.param(
        "amx",
        marks=pytest.mark.skipif(not cpu_bitmap.has_path("amx"), reason=cpu_bitmap.amx_reason() or "no AMX tile path"),
    ),
    pytest.param(
        "pairs",
        marks=pytest.mark.skipif(
            not cpu_bitmap.has_path("avx512-bf16"), reason="the pair path needs a CPU with AVX512_BF16"
        ),
    ),
]
_TILE_PATH_NAMES = {"amx": "tiles amx", "amx-emulated": "tiles amx-emulated", "pairs": "pairs avx512-bf16"}


@pytest.mark.parametrize("tiles", TILE_PATHS)
@KERNEL_SETTINGS
@given(
    shape=SHAPES,
    density=DENSITIES,
    batch=st.one_of(st.sampled_from([1, 15, 16, 17, 64, 65, 128, 130]), BATCHES),
    seed=st.integers(0, 2**16),
)
def test_tile_path_matches_float64_with_x_in_bf16(tiles, shape, density, batch, seed):
    """The tile paths for bf16 values (AMX, its scalar emulation of the same tiles, and the
    AVX512_BF16 pair path): row blocks with tails, empty blocks, column blocks, batch
    passes of up to four (tiles) or eight (pairs) 16-row tiles with tails; within fp32
    accumulation error of float64 on x rounded to bf16 (the error the path adds beyond
    that rounding is the accumulation's)."""
    tensors, dense = _factor(shape, density, seed, torch.bfloat16)
    factor = [
        tensors["bitmap"],
        tensors["row_offsets"],
        tensors["values"],
        torch.empty(0),
        torch.empty(0, dtype=torch.int16),
    ]
    code = {"amx": 1, "amx-emulated": 2, "pairs": 3}[tiles]
    x = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(seed + 1))
    plan = [1 if cpu_bitmap.has_path("avx2") else 0, 0, 1 << 30, 0, 0, code, 1]
    assert torch.ops.dsf.bitmap_path(batch, torch.float32, factor, shape[1], plan) == _TILE_PATH_NAMES[tiles]
    y = torch.ops.dsf.bitmap_spmm(x, factor, shape[1], plan)
    assert y.shape == (batch, shape[0])
    assert _relative_error(y, x.bfloat16().double() @ dense.double().t()) < 1e-5


def test_the_library_says_why_there_is_no_amx_path():
    reason = cpu_bitmap.amx_reason()
    assert (reason == "") == cpu_bitmap.has_path("amx"), reason
    flags = _cpu_flags()
    if flags is not None and not {"amx_tile", "amx_bf16"} <= flags:
        assert reason.startswith(cpu_bitmap._NO_AMX_HARDWARE), reason  # not an OS or permission refusal


def test_an_amx_cpu_that_cannot_use_its_tiles_says_why(monkeypatch):
    refused = "Linux refused the tile-data permission (arch_prctl ARCH_REQ_XCOMP_PERM: No space left on device)"
    monkeypatch.setattr(cpu_bitmap, "tile_path", lambda: "none")
    monkeypatch.setattr(cpu_bitmap, "amx_reason", lambda: refused)
    assert backend.describe().endswith(f"; no AMX tiles: {refused}")
    monkeypatch.setattr(cpu_bitmap, "amx_reason", lambda: "the CPU has no AMX-TILE and AMX-BF16")
    assert "AMX" not in backend.describe()  # nothing to say on CPUs without AMX


def _cpu_flags() -> set[str] | None:
    """The CPU's flags as Linux lists them, or None off Linux."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def test_the_tile_path_is_chosen_for_bf16_factors_from_its_batch(monkeypatch):
    """DSF_AMX=emulate gives bf16 factors the (emulated) tile path from DSF_AMX_MIN_BATCH
    on, and fp16 or int8 factors never; DSF_AMX=off, or a CPU without AMX under auto,
    none. A pair through DSFLinear stays within bf16 rounding of float64 on either side."""
    if not cpu_bitmap.has_path("tiles-emulated"):
        pytest.skip("an x86 build has the emulated tiles")
    monkeypatch.setenv("DSF_AMX", "emulate")
    monkeypatch.setenv("DSF_AMX_MIN_BATCH", "9")
    layer = _bound_layer(7, 70, 50, 90)
    right, left = layer.prepared_operands
    assert (right.paths.tiles, right.paths.tiles_min_batch) == ("amx-emulated", 9)
    assert backend.path_at(right, 8) != "tiles amx-emulated" and backend.path_at(right, 9) == "tiles amx-emulated"
    assert "amx-emulated tiles from batch 9" in backend.describe()
    for batch in (8, 9, 40):
        x = torch.randn(batch, 90, generator=torch.Generator().manual_seed(batch))
        assert _relative_error(layer(x), x.double() @ layer.to_dense_weight().double().t()) < 2**-8
    for dtype in (torch.float16, torch.int8):
        tensors = get_format("bitmap").pack(random_sparse(20, 64, 0.5), dtype)
        assert backend.prepare("bitmap", tensors, (20, 64), torch.float32).paths.tiles == "none"
    monkeypatch.setenv("DSF_AMX", "off")
    monkeypatch.setattr(cpu_bitmap, "_measured_start", lambda path: 0)  # the plan timed no tile path faster
    assert backend.refresh(right).paths.tiles == "none" and backend.refresh(right).plan[5:7] == [0, 0]
    monkeypatch.setattr(cpu_bitmap, "_measured_start", lambda path: 16)
    pairs = "pairs" if cpu_bitmap.has_path("avx512-bf16") else "none"
    assert backend.refresh(right).paths.tiles == pairs  # DSF_AMX=off leaves the AVX512_BF16 pair path
    monkeypatch.setenv("DSF_AMX", "auto")
    assert backend.refresh(right).paths.tiles == ("amx" if cpu_bitmap.has_path("amx") else pairs)
    monkeypatch.setenv("DSF_CPU_ISA", "avx512")  # without the bf16 dot products
    assert backend.refresh(right).paths.tiles == ("amx" if cpu_bitmap.has_path("amx") else "none")
    monkeypatch.delenv("DSF_CPU_ISA")
    if not cpu_bitmap.has_path("amx"):
        with pytest.raises(RuntimeError, match="amx tile path is not available on this CPU"):
            torch.ops.dsf.bitmap_spmm(torch.randn(20, 90), right.tensors, 90, right.plan[:5] + [1, 1])


@pytest.mark.skipif(not cpu_bitmap.has_path("avx512-bf16"), reason="the bf16 dot path needs AVX512_BF16")
def test_fp32_x_takes_the_bf16_dot_path_from_its_batch(monkeypatch):
    """On AVX512_BF16 CPUs fp32 x of a bf16 factor is rounded to bf16 for the dot path from
    round_x_min_batch on (batch 1 keeps the split-x word path, exact to 2^-16), within fp32
    accumulation error of float64 on the rounded x; DSF_ROUND_X=off keeps fp32 x; fp16
    factors never round."""
    monkeypatch.setenv("DSF_AMX", "off")
    shape = (200, 700)
    tensors, dense = _factor(shape, 0.3, 5, torch.bfloat16)
    p = backend.prepare("bitmap", tensors, shape, torch.float32)
    start = cpu_bitmap.ROUND_X_MIN_BATCH
    assert p.plan[7] == start and not backend.path_at(p, start - 1).startswith("dot")
    for batch in (start, 5, p.paths.nz_min_batch - 1):
        assert backend.path_at(p, batch).startswith("dot"), batch
        x = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(batch))
        ref = x.bfloat16().double() @ dense.double().t()
        assert _relative_error(backend.matmul(p, x), ref) < 1e-5
        assert _relative_error(backend.matmul(p, x), x.double() @ dense.double().t()) > 1e-5  # it did round
    monkeypatch.setenv("DSF_ROUND_X", "off")
    assert backend.refresh(p).plan[7] == 0 and backend.path_at(p, 5).startswith("words")
    monkeypatch.delenv("DSF_ROUND_X")
    fp16 = backend.prepare("bitmap", _factor(shape, 0.3, 5, torch.float16)[0], shape, torch.float32)
    assert fp16.plan[7] == 0 and not backend.path_at(fp16, 5).startswith("dot")
    with pytest.raises(RuntimeError, match="round_min_batch must be >= 0"):
        torch.ops.dsf.bitmap_spmm(torch.randn(2, 700), p.tensors, 700, p.plan[:7] + [-1])


@pytest.mark.parametrize("value_dtype", [torch.float16, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("shape", [(70, 1100), (130, 576)])
@pytest.mark.parametrize("batch", [33, 48, 64, 65, 100, 129])
def test_prefill_batches_in_chunks_of_up_to_64_match_dense(monkeypatch, value_dtype, shape, batch):
    """Batches past 32 (prefill) run in chunks of up to 64 rows of x on the nonzero path,
    with one set of accumulators from 5 vectors per x^T row on; chunk edges and the
    column blocks (4 words at 64 rows) give the dense product."""
    monkeypatch.setenv("DSF_ROUND_X", "off")  # bf16 factors would take the pair path (x in bf16)
    monkeypatch.setenv("DSF_AMX", "off")
    tensors = get_format("bitmap").pack(random_sparse(*shape, 0.4, seed=batch, empty_rows=1), value_dtype)
    dense = get_format("bitmap").unpack(tensors, shape).double()
    p = backend.prepare("bitmap", tensors, shape, torch.float32)
    x = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(4))
    ref = x.double() @ dense.t()
    assert float((backend.matmul(p, x).double() - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.parametrize("value_dtype", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("density", [0.1, 0.5])
def test_operands_are_built_once_and_any_layout_of_x_gives_the_same_result(monkeypatch, value_dtype, density):
    """prepare() builds the op's operands and plan once; a contiguous and a strided x
    (the same numbers) give bitwise the same y, also on a deep copy whose original is
    gone; refresh() rebuilds the plan when a setting changes."""
    import copy
    import gc

    shape = (96, 256)
    tensors = get_format("bitmap").pack(random_sparse(*shape, density, seed=5), value_dtype)
    dense = get_format("bitmap").unpack(tensors, shape).double()
    p = backend.prepare("bitmap", tensors, shape, torch.float32)
    assert len(p.tensors) == 5 and p.plan == p.paths.codes()
    # factors on the AVX2 paths (int8 values, and on some AVX-512 CPUs fp16 values) index sparse factors
    assert (p.paths.columns_max_batch >= 1) == (density < 0.2 and p.paths.isa == "avx2")
    x = torch.randn(1, shape[1], generator=torch.Generator().manual_seed(2))
    strided = torch.stack([x[0], x[0]], dim=1)[:, 0].unsqueeze(0)  # the same numbers, not contiguous
    assert not strided.is_contiguous()
    fast, general = backend.matmul(p, x), backend.matmul(p, strided)
    assert torch.equal(fast, general)
    ref = x.double() @ dense.t()
    assert float((fast.double() - ref).abs().max() / ref.abs().max()) < 1e-5
    twin = copy.deepcopy(p)
    del p, tensors
    gc.collect()
    assert torch.equal(backend.matmul(twin, x), fast)
    monkeypatch.setenv("DSF_NZ_MIN_BATCH", "1")
    assert backend.refresh(twin).plan[2] == 1 and torch.allclose(backend.matmul(twin, x), fast, rtol=1e-4, atol=1e-4)


def test_a_bad_isa_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("DSF_CPU_ISA", "avx1024")
    tensors = get_format("bitmap").pack(random_sparse(8, 64, 0.5), torch.bfloat16)
    with pytest.raises(ValueError, match="DSF_CPU_ISA must be avx512, avx2 or portable, not 'avx1024'"):
        backend.prepare("bitmap", tensors, (8, 64), torch.float32)


@pytest.mark.parametrize("bad", ["0", "-3", "many", "1.5"])
def test_a_bad_nz_min_batch_is_a_clear_error(monkeypatch, bad):
    """A bad setting is refused when a layer is prepared (loaded), and by refresh()."""
    tensors = get_format("bitmap").pack(torch.eye(8), torch.float16)
    p = backend.prepare("bitmap", tensors, (8, 8), torch.float32)
    monkeypatch.setenv("DSF_NZ_MIN_BATCH", bad)
    with pytest.raises(ValueError, match="DSF_NZ_MIN_BATCH must be a positive integer"):
        backend.prepare("bitmap", tensors, (8, 8), torch.float32)
    with pytest.raises(ValueError, match="DSF_NZ_MIN_BATCH must be a positive integer"):
        backend.refresh(p)


def test_auto_prefers_the_kernel_for_fp16_bitmap_and_declines_fp32():
    fp16 = get_format("bitmap").pack(torch.eye(8), torch.float16)
    fp32 = get_format("bitmap").pack(torch.eye(8), torch.float32)
    assert choose_backend("bitmap", "cpu", tensors=fp16).name == "cpu-bitmap"
    assert choose_backend("bitmap", "cpu", tensors=fp32).name == "torch-csr"


def test_dsf_linear_uses_kernel():
    L = random_sparse(50, 40, 0.34).half().float()
    R = random_sparse(40, 70, 0.16, seed=1).half().float()
    layer = DSFLinear.from_factors(L, R, torch.randn(50), fmt="bitmap", value_dtype=torch.float16)
    x = torch.randn(2, 7, 70)
    y = layer(x)
    assert layer.backend_name == "cpu-bitmap"
    torch.testing.assert_close(y, torch.nn.functional.linear(x, L @ R, layer.bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_operands_use_their_own_memory(how):
    """Prepared operands keep their tensors' addresses; a copy must carry the copy's, so
    that it stays correct once the original is gone (a deep-copied or pickled model)."""
    import copy
    import gc
    import pickle

    L = random_sparse(50, 40, 0.34).half().float()
    R = random_sparse(40, 70, 0.16, seed=1).half().float()
    layer = DSFLinear.from_factors(L, R, torch.randn(50), fmt="bitmap", value_dtype=torch.float16)
    x = torch.randn(3, 70)
    ref = layer(x)  # prepares (and caches) the operands
    twin = copy.deepcopy(layer) if how == "deepcopy" else pickle.loads(pickle.dumps(layer))
    right, left = twin._prepared
    assert (
        left.tensors[2].data_ptr() == twin.L.stored()["values"].data_ptr() != layer._prepared[1].tensors[2].data_ptr()
    )
    if backend.isa == "avx2":  # R (16% dense) carries column indices, and the copy its own
        assert right.columns is not None and right.columns.data_ptr() != layer._prepared[0].columns.data_ptr()
        torch.testing.assert_close(right.columns, layer._prepared[0].columns)
    del layer
    gc.collect()
    torch.zeros(1 << 20).fill_(float("nan"))  # reuse the freed memory for something else
    torch.testing.assert_close(twin(x), ref)


@KERNEL_SETTINGS
@given(shape=SHAPES, density=DENSITIES, batch=BATCHES, seed=st.integers(0, 2**16))
def test_bf16_model_path_matches_dense_bf16(shape, density, batch, seed):
    """bf16 values and bf16 activations (a model run in bf16): exact bf16 products,
    fp32 accumulation, so it matches the float64 product of the same bf16 numbers."""
    dense = random_sparse(*shape, density, seed=seed).to(torch.bfloat16)
    p = backend.prepare("bitmap", get_format("bitmap").pack(dense, torch.bfloat16), shape, torch.bfloat16)
    x = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(seed + 1)).to(torch.bfloat16)
    y = backend.matmul(p, x)
    assert y.dtype == torch.bfloat16 and y.shape == (batch, shape[0])
    assert _relative_error(y, x.double() @ dense.double().t()) < 2**-8  # the bf16 rounding of the output


@pytest.fixture
def on_avx2(monkeypatch):
    """The AVX2 paths (the column-index path is theirs): native on AVX2 CPUs, forced by
    DSF_CPU_ISA=avx2 on AVX-512 ones (which all have AVX2)."""
    if backend.isa != "avx2":
        if not cpu_bitmap.has_path("avx2"):
            pytest.skip("this CPU has no AVX2")
        monkeypatch.setenv("DSF_CPU_ISA", "avx2")


needs_avx2 = pytest.mark.usefixtures("on_avx2")


@pytest.mark.skipif(not cpu_bitmap.has_path("avx2"), reason="this CPU has no AVX2")
@KERNEL_SETTINGS
@given(value_dtype=VALUE_DTYPES, shape=SHAPES, density=DENSITIES, batch=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_column_path_matches_dense(value_dtype, shape, density, batch, seed):
    """The column-index path, forced on for any density and batch: rows of 0-7, 8-15 and
    16+ nonzeros (the scalar tail, one and two vectors), empty rows, x strided."""
    with pytest.MonkeyPatch.context() as mp:
        if backend.isa != "avx2":
            mp.setenv("DSF_CPU_ISA", "avx2")
        mp.setenv("DSF_COLUMNS_MAX_DENSITY", "1")
        mp.setenv("DSF_COLUMNS_MAX_BATCH", "16")
        tensors, dense = _factor(shape, density, seed, value_dtype)
        p = backend.prepare("bitmap", tensors, shape, torch.float32)
        if shape[1] > 65536 or not shape[0]:
            return
        assert p.columns is not None and p.columns.numel() == tensors["values"].numel()
        x = torch.randn(shape[1], batch, generator=torch.Generator().manual_seed(seed + 1)).t()  # non-contiguous
        y = backend.matmul(p, x)
    assert y.shape == (batch, shape[0])
    assert _relative_error(y, x.double() @ dense.double().t()) < 1e-5


@needs_avx2
def test_columns_are_built_for_sparse_factors_only(monkeypatch):
    pack = get_format("bitmap").pack

    def columns(density: float, shape: tuple[int, int] = (64, 300)) -> torch.Tensor | None:
        return backend.prepare(
            "bitmap", pack(random_sparse(*shape, density), torch.float16), shape, torch.float32
        ).columns

    sparse = columns(0.1)
    assert sparse is not None
    # each row's nonzeros' columns, in order
    dense = random_sparse(64, 300, 0.1)
    expected = torch.cat([row.nonzero().flatten() for row in dense])
    assert torch.equal(sparse.to(torch.int64) & 0xFFFF, expected)
    assert columns(0.5) is None  # above COLUMNS_MAX_DENSITY: the word path is faster
    assert columns(0.001, (2, 70000)) is None  # columns past 16 bits
    monkeypatch.setenv("DSF_COLUMNS_MAX_DENSITY", "0")
    assert columns(0.1) is None


@needs_avx2
def test_streamed_bytes_follow_the_path():
    shape = (64, 300)
    tensors = get_format("bitmap").pack(random_sparse(*shape, 0.1), torch.float16)
    p = backend.prepare("bitmap", tensors, shape, torch.float32)
    values = tensors["values"].numel() * 2
    assert backend.streamed_bytes(p, 1) == values + 4 * (shape[0] + 1) + 2 * tensors["values"].numel()
    assert backend.streamed_bytes(p, 2) == values + tensors["bitmap"].numel() * 4


def test_the_reported_path_is_the_ops_choice(monkeypatch):
    """path_at asks the op which path a call takes: the column index at batch 1 for a sparse
    factor on AVX2, words below DSF_NZ_MIN_BATCH, nonzeros from it; portable runs nonzeros."""
    shape = (64, 300)
    tensors = get_format("bitmap").pack(random_sparse(*shape, 0.1), torch.bfloat16)
    monkeypatch.setenv("DSF_NZ_MIN_BATCH", "5")
    monkeypatch.setenv("DSF_ROUND_X", "off")
    p = backend.prepare("bitmap", tensors, shape, torch.float32)
    isa = p.paths.isa
    words = f"words {'avx512-256' if p.paths.ymm else 'avx512' if isa == 'avx512-vbmi2' else isa}"
    first = "columns avx2" if p.columns is not None else words
    nonzeros = f"nonzeros {'avx512' if p.paths.nz_isa == 'avx512-vbmi2' else p.paths.nz_isa}"
    assert [backend.path_at(p, n) for n in (1, 2, 4, 5, 64)] == [first, words, words, nonzeros, nonzeros]
    monkeypatch.setenv("DSF_CPU_ISA", "portable")
    assert backend.path_at(backend.refresh(p), 2) == "nonzeros portable"


@needs_avx2
def test_large_factors_switch_to_nonzeros_at_their_own_batch(monkeypatch):
    """tuning.json's nz_min_batch_large holds from large_factor_cells on; smaller factors keep
    nz_min_batch; DSF_NZ_MIN_BATCH overrides both."""
    monkeypatch.delenv("DSF_NZ_MIN_BATCH", raising=False)
    small, large = cpu_bitmap.NZ_MIN_BATCH["avx2"], cpu_bitmap.NZ_MIN_BATCH_LARGE["avx2"]
    assert large < small
    rows = cpu_bitmap.LARGE_FACTOR_CELLS // 1024
    for shape, switch in (((rows, 1024), large), ((rows - 1, 1024), small)):
        tensors = get_format("bitmap").pack(random_sparse(*shape, 0.3), torch.bfloat16)
        p = backend.prepare("bitmap", tensors, shape, torch.float32)
        assert p.paths.nz_min_batch == switch, shape
        assert backend.path_at(p, switch - 1).startswith("words") and backend.path_at(p, switch) == "nonzeros avx2"
        monkeypatch.setenv("DSF_NZ_MIN_BATCH", "3")
        assert backend.refresh(p).paths.nz_min_batch == 3
        monkeypatch.delenv("DSF_NZ_MIN_BATCH")


@needs_avx2
@pytest.mark.parametrize(
    "name,bad,message",
    [
        ("DSF_COLUMNS_MAX_DENSITY", "1.5", "DSF_COLUMNS_MAX_DENSITY must be a number in"),
        ("DSF_COLUMNS_MAX_DENSITY", "dense", "DSF_COLUMNS_MAX_DENSITY must be a number in"),
        ("DSF_COLUMNS_MAX_BATCH", "-1", "DSF_COLUMNS_MAX_BATCH must be a non-negative integer"),
        ("DSF_COLUMNS_MAX_BATCH", "one", "DSF_COLUMNS_MAX_BATCH must be a non-negative integer"),
    ],
)
def test_bad_column_settings_are_clear_errors(monkeypatch, name, bad, message):
    tensors = get_format("bitmap").pack(random_sparse(16, 64, 0.1), torch.float16)
    monkeypatch.setenv(name, bad)
    with pytest.raises(ValueError, match=message):
        backend.matmul(backend.prepare("bitmap", tensors, (16, 64), torch.float32), torch.randn(1, 64))


@needs_avx2
@pytest.mark.parametrize("corruption", ["popcount", "past_last_column", "offsets", "bitmap_shape"])
def test_columns_of_an_inconsistent_factor_are_refused(corruption):
    """prepare() decodes the columns itself and never trusts a factor that slipped past
    load-time validation: a clear ValueError, not a read outside x."""
    shape = (16, 40)
    tensors = {k: v.clone() for k, v in get_format("bitmap").pack(random_sparse(*shape, 0.1), torch.float16).items()}
    if corruption == "popcount":
        tensors["bitmap"][3, 0] ^= 1 << 5
    elif corruption == "past_last_column":
        row = int((tensors["row_offsets"][1:] - tensors["row_offsets"][:-1]).argmax())
        word = tensors["bitmap"][row, 1]
        set_bit = int(word & -word)  # move the row's lowest bit in word 1 to column 63
        tensors["bitmap"][row, 1] = (word ^ set_bit) | torch.tensor(1 << 31, dtype=torch.int64).to(torch.int32)
    elif corruption == "offsets":
        tensors["row_offsets"][5] = -7
    else:
        tensors["bitmap"] = tensors["bitmap"][:, :1].contiguous()
    with pytest.raises(ValueError, match="bitmap factor"):
        backend.prepare("bitmap", tensors, shape, torch.float32)


needs_avx512 = pytest.mark.skipif(
    not cpu_bitmap.has_path("avx512-vbmi2") or backend.isa == "portable", reason="this CPU has no AVX-512 VBMI2 path"
)


@needs_avx512
@KERNEL_SETTINGS
@given(
    width=st.sampled_from(["512", "256"]),
    value_dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    shape=SHAPES,
    density=DENSITIES,
    batch=st.one_of(st.integers(1, 16), BATCHES),
    seed=st.integers(0, 2**16),
)
def test_avx512_variants_match_dense(width, value_dtype, shape, density, batch, seed):
    """Both widths of the AVX-512 paths, forced. The 512-bit ones are exact to fp32
    rounding, and so are the AVX2 paths that fp16 values and the nonzero path take at
    256; the 256-bit word variant (bf16 values) carries x as two bf16 parts, so each
    product's x is off by at most 2^-16 of |x|: the error stays under 2^-15 of
    sum |w| |x| per output."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSF_AVX512_WIDTH", width)
        mp.setenv("DSF_ROUND_X", "off")  # the vector paths, not the pair path
        tensors, dense = _factor(shape, density, seed, value_dtype)
        dense = dense.double()
        p = backend.prepare("bitmap", tensors, shape, torch.float32)
        bf16 = value_dtype == torch.bfloat16
        split = width == "256" and bf16 and cpu_bitmap.has_path("avx512-bf16")
        assert p.paths.ymm == split
        assert p.paths.isa == ("avx512-vbmi2" if width == "512" or split else "avx2")
        assert p.paths.nz_isa == ("avx512-vbmi2" if width == "512" else "avx2")
        x = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(seed + 1))
        y = backend.matmul(p, x).double()
    ref = x.double() @ dense.t()
    if split and batch < p.paths.nz_min_batch:
        bound = 2.0**-15 * (x.double().abs() @ dense.abs().t()) + 1e-30
        assert bool(((y - ref).abs() <= bound).all()), float(((y - ref).abs() / bound).max())
    else:
        assert _relative_error(y, ref) < 1e-5


@needs_avx512
@pytest.mark.parametrize("width", ["512", "256"])
@pytest.mark.parametrize("shape", [(830, 545), (1, 33), (300, 4096)])
@pytest.mark.parametrize("batch", [1, 2, 4, 7])
def test_bf16_model_path_variants_match_dense_bf16(monkeypatch, width, shape, batch):
    if not cpu_bitmap.has_path("avx512-bf16"):
        pytest.skip("this CPU has no AVX512_BF16")
    monkeypatch.setenv("DSF_AVX512_WIDTH", width)
    dense = random_sparse(*shape, 0.4, seed=batch).to(torch.bfloat16)
    p = backend.prepare("bitmap", get_format("bitmap").pack(dense, torch.bfloat16), shape, torch.bfloat16)
    assert p.paths.bf16_dot and p.paths.dot_ymm == (width == "256")
    x = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    y = backend.matmul(p, x)
    ref = x.double() @ dense.double().t()
    assert float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)) < 2**-8


@needs_avx512
def test_the_plan_times_every_variant_this_cpu_has():
    plan = cpu_bitmap.path_plan()
    assert plan is not None and set(plan.ns) == set(cpu_bitmap.PLAN_CANDIDATES)
    for name, ns in plan.ns.items():
        bf16, amx = cpu_bitmap.has_path("avx512-bf16"), cpu_bitmap.has_path("amx")
        if name.startswith("amx"):
            missing = not amx
        elif name == "avx512 nonzeros 64":  # timed beside the tile or pair path at 64
            missing = not (amx or bf16)
        else:  # AVX512_BF16's: the 256-bit variants, the bf16-model dot paths, the pair path
            missing = (name.startswith(("avx512-256", "avx512 pairs")) or name.endswith("bf16 model")) and not bf16
        assert (ns is None) == missing, name
        assert ns is None or 0 < ns < 1e9  # one call on a 2048 x 4096 factor: well under a second
    assert backend.describe().startswith("avx512-vbmi2; words: bf16 values ")
    names, _ = torch.ops.dsf.plan_paths()  # every variant the library times is one the plan knows
    assert set(names) <= set(cpu_bitmap.PLAN_CANDIDATES) and len(set(names)) == len(names)


@needs_avx512
def test_the_plan_is_timed_on_first_use_not_at_build(monkeypatch):
    """Loading the kernel, and preparing int8 factors (which run the AVX2 paths), time
    nothing; the first fp16/bf16 factor times the plan, once."""
    calls = []
    measure = cpu_bitmap._measure_plan
    monkeypatch.setattr(cpu_bitmap, "_measure_plan", lambda: calls.append(1) or measure())
    monkeypatch.setattr(cpu_bitmap, "_PLAN", None)
    monkeypatch.setattr(cpu_bitmap, "_PLANNED", False)
    assert cpu_bitmap.build() and backend.available()
    shape = (40, 96)
    backend.prepare("bitmap", get_format("bitmap").pack(random_sparse(*shape, 0.3), torch.int8), shape, torch.float32)
    assert calls == []
    for _ in range(2):
        backend.prepare(
            "bitmap", get_format("bitmap").pack(random_sparse(*shape, 0.3), torch.bfloat16), shape, torch.float32
        )
    assert calls == [1] and cpu_bitmap.path_plan() is not None and calls == [1]


@pytest.mark.parametrize(
    "plan,message",
    [
        ([1, 1, 16, 0], "plan has 5, 7 or 8 entries"),
        ([1, 1, 16, 0, 0, 4, 16], "tile path code must be 0-3"),
        ([7, 1, 16, 0, 0], "word path code must be 0-3"),
        ([1, 5, 16, 0, 0], "nonzero path code must be 0-2"),
        ([1, 1, 16, 0, 1], "dot path code must be 0, 2 or 3"),
    ],
)
def test_the_op_refuses_a_bad_plan(plan, message):
    tensors = get_format("bitmap").pack(random_sparse(8, 64, 0.5), torch.float16)
    p = backend.prepare("bitmap", tensors, (8, 64), torch.float32)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.dsf.bitmap_spmm(torch.randn(1, 64), p.tensors, 64, plan)


@needs_avx512
def test_the_op_refuses_a_path_the_values_lack():
    """The 256-bit word variant has no fp16 form, the AVX-512 word path no int8 one."""
    for dtype, word, message in (
        (torch.float16, 3, "avx512-256 word path takes bf16"),
        (torch.int8, 2, "avx512 word path takes fp16 or bf16"),
    ):
        tensors = get_format("bitmap").pack(random_sparse(8, 64, 0.5), dtype)
        p = backend.prepare("bitmap", tensors, (8, 64), torch.float32)
        if word == 3 and not cpu_bitmap.has_path("avx512-bf16"):
            continue
        with pytest.raises(RuntimeError, match=message):
            torch.ops.dsf.bitmap_spmm(torch.randn(1, 64), p.tensors, 64, [word, 1, 16, 0, 0])


def test_the_op_refuses_bad_operands_with_a_clear_error():
    tensors = get_format("bitmap").pack(random_sparse(8, 64, 0.5), torch.bfloat16)
    p = backend.prepare("bitmap", tensors, (8, 64), torch.float32)
    x = torch.randn(2, 64)
    cases = [
        ((torch.randn(2, 63), p.tensors, 64), "x has 63 columns; the factor takes 64"),
        ((torch.randn(2, 64, 1), p.tensors, 64), "x must be a 2-D CPU tensor"),
        ((x.double(), p.tensors, 64), "x must be float32, bfloat16 or float16"),
        ((x, p.tensors[:4], 64), r"\[bitmap, row_offsets, values, scales, columns\], got 4"),
        ((x, p.tensors, 100), "needs 4 bitmap words per row, got 2"),
        ((x, [p.bitmap, p.offsets[:-1], *p.tensors[2:]], 64), "row_offsets must be 9 int32 values"),
        ((x, [p.bitmap, p.offsets, p.values[:-1], *p.tensors[3:]], 64), "end at the value count"),
        ((x, [p.bitmap, p.offsets, p.values.float(), *p.tensors[3:]], 64), "fp16, bf16 or int8"),
        ((x, [*p.tensors[:4], torch.zeros(3, dtype=torch.int16)], 64), "columns must be empty or"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.dsf.bitmap_spmm(*args, p.plan)


@pytest.mark.parametrize("value_dtype", [torch.float16, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_the_pair_op_is_the_two_factor_calls(value_dtype, x_dtype):
    """bitmap_pair(x, R, L) equals L's call on R's, bitwise, at every path switch; an
    empty batch gives an empty y; factors that do not chain are refused."""
    fmt = get_format("bitmap")
    L, R = random_sparse(40, 24, 0.3, seed=1), random_sparse(24, 70, 0.2, seed=2)
    right = backend.prepare("bitmap", fmt.pack(R, value_dtype), (24, 70), x_dtype)
    left = backend.prepare("bitmap", fmt.pack(L, value_dtype), (40, 24), x_dtype)
    for batch in (0, 1, 3, 16, 33):
        x = torch.randn(batch, 70).to(x_dtype)
        y = backend.pair(right, left, x)
        assert y.dtype == x_dtype and y.shape == (batch, 40)
        assert torch.equal(y, backend.matmul(left, backend.matmul(right, x)))
    with pytest.raises(RuntimeError, match="left factor takes 24 columns; the right one gives 40"):
        torch.ops.dsf.bitmap_pair(torch.randn(1, 24), left.tensors, 24, left.plan, left.tensors, 24, left.plan)


def test_a_compiled_model_matches_eager():
    """torch.compile sees the ops (fake shapes registered), with no graph break: a tiny
    DSF decoder compiled with fullgraph=True gives the eager logits."""
    from tests_support import tiny_dsf_llama

    model = tiny_dsf_llama()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        eager = model(ids).logits  # prepares every layer's operands
    from dsf_runtime.patch import dsf_modules

    assert {m.backend_name for m in dsf_modules(model).values()} == {"cpu-bitmap"}
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.inference_mode():
        got = compiled(ids).logits
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)


def _bound_layer(seed: int = 0, out: int = 40, rank: int = 24, inp: int = 33) -> DSFLinear:
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(out, rank, generator=g) * (torch.rand(out, rank, generator=g) < 0.4)
    R = torch.randn(rank, inp, generator=g) * (torch.rand(rank, inp, generator=g) < 0.4)
    layer = DSFLinear.from_factors(L, R, None, value_dtype=torch.bfloat16)
    layer.prepare()
    return layer


@pytest.mark.parametrize("lead", [(), (1,), (3,), (2, 1), (2, 5, 1)])
def test_bound_pair_matches_the_operand_lists(lead):
    """Eager calls pass handles; the result is the list op's, bit for bit, for x of any
    leading dimensions (flattened in C++)."""
    layer = _bound_layer()
    right, left = layer.prepared_operands
    assert right.handle and left.handle and right.handle != left.handle
    x = torch.randn(*lead, 33, generator=torch.Generator().manual_seed(1))
    got = torch.ops.dsf.bitmap_pair_bound(x, right.handle, left.handle, left.rows)
    h = x.reshape(-1, 33)
    want = torch.ops.dsf.bitmap_pair(h, right.tensors, right.cols, right.plan, left.tensors, left.cols, left.plan)
    assert got.shape == (*lead, 40)
    assert torch.equal(got.reshape(-1, 40), want)
    torch.testing.assert_close(layer(x), want.reshape(*lead, 40))


def test_bound_right_handle_zero_is_one_matrix():
    """Handle 0 for R: the bound ops apply L alone (a pruned one-matrix layer)."""
    layer = _bound_layer()
    right, left = layer.prepared_operands
    h = torch.randn(3, right.rows, generator=torch.Generator().manual_seed(2))  # L's input width
    got = torch.ops.dsf.bitmap_pair_bound(h, 0, left.handle, left.rows)
    assert torch.equal(got, backend.matmul(left, h))


def test_bound_handles_are_released_and_checked():
    """A handle dies with its operands (a stale one is a clear error, never a read of freed
    memory); a deep copy binds its own and outlives the original; re-deciding the paths
    rebinds; wrong output widths and chains are refused."""
    import copy
    import gc

    layer = _bound_layer()
    right, left = layer.prepared_operands
    x = torch.randn(2, 33)
    want = layer(x)
    clone = copy.deepcopy(layer)
    c_right, c_left = clone.prepared_operands
    assert {c_right.handle, c_left.handle}.isdisjoint({right.handle, left.handle})
    with pytest.raises(RuntimeError, match="the left factor has 40 rows, not 41"):
        torch.ops.dsf.bitmap_pair_bound(x, right.handle, left.handle, 41)
    with pytest.raises(RuntimeError, match="the left factor takes 24 columns; the right one gives 40"):
        torch.ops.dsf.bitmap_pair_bound(torch.randn(2, 24), left.handle, left.handle, 40)
    old = left.handle
    backend.refresh(left)  # new paths: a new binding, the old one released
    assert left.handle != old
    with pytest.raises(RuntimeError, match=f"no bound cpu-bitmap factor {old}"):
        torch.ops.dsf.bitmap_pair_bound(x, right.handle, old, 40)
    handles = (right.handle, left.handle)
    del layer, right, left
    gc.collect()
    with pytest.raises(RuntimeError, match="no bound cpu-bitmap factor"):
        torch.ops.dsf.bitmap_pair_bound(x, *handles, 40)
    torch.testing.assert_close(clone(x), want, rtol=0, atol=0)


def test_mlp_block_matches_float64_and_checks_its_operands(fp32_activations):
    """x + down(silu(gate(h)) * up(h)), h the RMS-normed x: within fp32 error of a float64
    computation of the same factors, including gate values whose exp overflows; bad
    operands are clear errors."""
    gate, up = _bound_layer(1, 56, 24, 33), _bound_layer(2, 56, 20, 33)
    down = _bound_layer(3, 33, 24, 56)
    weight = torch.randn(33, generator=torch.Generator().manual_seed(4))
    x = torch.randn(3, 1, 33, generator=torch.Generator().manual_seed(5)) * 30  # large |gate| values
    handles = [p.handle for layer in (gate, up, down) for p in layer.prepared_operands]
    got = torch.ops.dsf.mlp_block_bound(x, weight, 1e-5, handles)
    xd = x.double()
    h = weight.double() * (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5))
    g, u = h @ gate.to_dense_weight().double().t(), h @ up.to_dense_weight().double().t()
    want = xd + (torch.nn.functional.silu(g) * u) @ down.to_dense_weight().double().t()
    assert got.shape == x.shape
    assert _relative_error(got, want) < 1e-5
    with pytest.raises(RuntimeError, match="takes 6 handles"):
        torch.ops.dsf.mlp_block_bound(x, weight, 1e-5, handles[:4])
    with pytest.raises(RuntimeError, match="fp32 CPU tensors"):
        torch.ops.dsf.mlp_block_bound(x.bfloat16(), weight, 1e-5, handles)
    with pytest.raises(RuntimeError, match=r"x \(\.\.\., 33\)"):
        torch.ops.dsf.mlp_block_bound(torch.randn(2, 32), weight, 1e-5, handles)
    with pytest.raises(RuntimeError, match="gate and up map 33 features"):
        torch.ops.dsf.mlp_block_bound(x, weight, 1e-5, handles[2:4] + handles[:2] + handles[:2])


def test_attn_inputs_write_the_cache_and_refuse_bad_positions(fp32_activations):
    """q/k/v of the RMS-normed x with rotary on q and k, k and v written at each row's slot
    and position (nothing else touched), against float64; a position outside the cache,
    wrong dtypes or shapes are errors before anything is written."""
    heads, kv_heads, d, hidden = 4, 2, 8, 33
    q_l, k_l, v_l = (
        _bound_layer(i, rows, 16, hidden) for i, rows in ((1, heads * d), (2, kv_heads * d), (3, kv_heads * d))
    )
    handles = [p.handle for layer in (q_l, k_l, v_l) for p in layer.prepared_operands]
    g = torch.Generator().manual_seed(6)
    weight, x = torch.randn(hidden, generator=g), torch.randn(2, 1, hidden, generator=g)
    angles = torch.rand(2, 1, d // 2, generator=g) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # (2, 1, d)
    k_cache, v_cache = torch.zeros(3, kv_heads, 10, d), torch.zeros(3, kv_heads, 10, d)
    pos = torch.tensor([4, 9])
    q = torch.ops.dsf.attn_inputs_bound(x, weight, 1e-5, handles, cos, sin, k_cache, v_cache, pos, heads, kv_heads)

    xd = x.double()[:, 0]
    h = weight.double() * (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5))

    def rotated(layer, n):  # (2, n, d)
        t = (h @ layer.to_dense_weight().double().t()).view(2, n, d)
        c, s_ = cos.double(), sin.double()
        return t * c + torch.cat([-t[..., d // 2 :], t[..., : d // 2]], -1) * s_

    assert _relative_error(q[:, :, 0], rotated(q_l, heads)) < 1e-5
    assert _relative_error(k_cache[[0, 1], :, [4, 9]], rotated(k_l, kv_heads)) < 1e-5
    v_want = (h @ v_l.to_dense_weight().double().t()).view(2, kv_heads, d)
    assert _relative_error(v_cache[[0, 1], :, [4, 9]], v_want) < 1e-5
    assert int((k_cache != 0).sum()) == int((k_cache[[0, 1], :, [4, 9]] != 0).sum())  # nothing else written
    before = k_cache.clone()
    args = (cos, sin, k_cache, v_cache)
    with pytest.raises(RuntimeError, match="position 10 outside the cache's 10"):
        torch.ops.dsf.attn_inputs_bound(x, weight, 1e-5, handles, *args, torch.tensor([0, 10]), heads, kv_heads)
    with pytest.raises(RuntimeError, match="position -1 outside"):
        torch.ops.dsf.attn_inputs_bound(x, weight, 1e-5, handles, *args, torch.tensor([-1, 0]), heads, kv_heads)
    with pytest.raises(RuntimeError, match="int64 positions"):
        torch.ops.dsf.attn_inputs_bound(
            x, weight, 1e-5, handles, *args, torch.tensor([1, 2], dtype=torch.int32), heads, kv_heads
        )
    with pytest.raises(RuntimeError, match="caches"):
        torch.ops.dsf.attn_inputs_bound(
            x, weight, 1e-5, handles, cos, sin, k_cache[:1], v_cache[:1], pos, heads, kv_heads
        )
    with pytest.raises(RuntimeError, match="q, k, v map 33 features to 2 and 2 heads"):
        torch.ops.dsf.attn_inputs_bound(x, weight, 1e-5, handles, *args, pos, 2, kv_heads)
    with pytest.raises(RuntimeError, match="fp32 CPU tensors"):
        torch.ops.dsf.attn_inputs_bound(
            x, weight, 1e-5, handles, cos, sin, k_cache.double(), v_cache, pos, heads, kv_heads
        )
    assert torch.equal(k_cache, before)


def _attention_reference(q, k_cache, v_cache, pos, heads, kv_heads, scale):
    """float64 softmax(scale q K^T) V per row over positions 0..pos[b]: (n, heads * d)."""
    n, d, group = q.shape[0], q.shape[-1], heads // kv_heads
    out = torch.empty(n, heads, d, dtype=torch.float64)
    for b in range(n):
        keys = k_cache[b, :, : int(pos[b]) + 1].double().repeat_interleave(group, 0)  # (heads, span, d)
        values = v_cache[b, :, : int(pos[b]) + 1].double().repeat_interleave(group, 0)
        w = torch.softmax(scale * (keys @ q[b, :, 0].double().unsqueeze(-1)).squeeze(-1), -1)  # (heads, span)
        out[b] = (w.unsqueeze(-1) * values).sum(1)
    return out.view(n, heads * d)


@KERNEL_SETTINGS
@given(
    portable=st.booleans(),
    d=st.one_of(st.sampled_from([1, 7, 8, 16, 64, 72, 128]), st.integers(1, 140)),
    heads_kv=st.sampled_from([(1, 1), (4, 2), (9, 3), (6, 6)]),
    spans=st.lists(st.integers(1, 300), min_size=1, max_size=3),
    spread=st.sampled_from([0.1, 1.0, 30.0, 300.0]),
    seed=st.integers(0, 2**16),
)
def test_cached_attention_matches_float64(portable, d, heads_kv, spans, spread, seed):
    """One query per row over its cached positions, on this CPU's path and the portable
    one: head dims with and without 8-lane tails and 64-column blocks, spans with and
    without 8-position tails, grouped kv heads, and scores spread from flat to ~1e5 apart
    (most exponentials far below fp32's normal range) within fp32 error of float64."""
    heads, kv_heads = heads_kv
    n, max_len = len(spans), max(spans) + 3
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, heads, 1, d, generator=g) * spread / d**0.5
    k_cache = torch.randn(n + 1, kv_heads, max_len, d, generator=g)
    v_cache = torch.randn(n + 1, kv_heads, max_len, d, generator=g)
    pos = torch.tensor([s - 1 for s in spans])
    got = torch.ops.dsf.attend_cached(q, k_cache, v_cache, pos, heads, kv_heads, 1.0, portable)
    want = _attention_reference(q, k_cache, v_cache, pos, heads, kv_heads, 1.0)
    assert got.shape == (n, heads * d)
    assert _relative_error(got, want) < 2e-6 * max(1.0, spread / 10)


def test_cached_attention_passes_nan_on_and_checks_its_operands():
    """A NaN in a row's cached keys makes that row's output NaN (not a plausible number)
    and leaves the other rows alone; bad shapes and positions are clear errors."""
    q = torch.randn(2, 4, 1, 16)
    k_cache, v_cache = torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    k_cache[0, 0, 5, 3] = float("nan")
    pos = torch.tensor([30, 30])
    for portable in (False, True):
        got = torch.ops.dsf.attend_cached(q, k_cache, v_cache, pos, 4, 2, 0.25, portable).view(2, 4, 16)
        assert got[0, :2].isnan().all() and not got[0, 2:].isnan().any() and not got[1].isnan().any()
    with pytest.raises(RuntimeError, match="position 40 outside the cache's 40"):
        torch.ops.dsf.attend_cached(q, k_cache, v_cache, torch.tensor([40, 0]), 4, 2, 0.25)
    with pytest.raises(RuntimeError, match="5 heads over 2 kv heads"):
        torch.ops.dsf.attend_cached(q, k_cache, v_cache, pos, 5, 2, 0.25)
    with pytest.raises(RuntimeError, match="caches"):
        torch.ops.dsf.attend_cached(q, k_cache, v_cache[:, :, :30].contiguous(), pos, 4, 2, 0.25)
    with pytest.raises(RuntimeError, match=r"q \(n <= slots"):
        torch.ops.dsf.attend_cached(torch.randn(3, 4, 1, 16), k_cache, v_cache, torch.tensor([1, 2, 3]), 4, 2, 0.25)
    with pytest.raises(RuntimeError, match="contiguous fp32"):
        torch.ops.dsf.attend_cached(q.double(), k_cache, v_cache, pos, 4, 2, 0.25)


def test_decode_layer_checks_its_operands():
    """The whole-layer op refuses a wrong handle count, heads that do not group over the kv
    heads and an o_proj of the wrong width (its numerics: tests/test_runner.py)."""
    layer = _bound_layer()
    h = [p.handle for p in layer.prepared_operands] * 7
    x, w = torch.randn(1, 1, 33), torch.ones(33)
    cache = torch.zeros(1, 2, 4, 8)
    args = (torch.ones(1, 1, 8), torch.zeros(1, 1, 8), cache, cache.clone(), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="takes 14 handles"):
        torch.ops.dsf.decode_layer_bound(x, w, 1e-5, w, 1e-5, h[:12], *args, 4, 2, 0.1)
    with pytest.raises(RuntimeError, match="5 heads over 2 kv heads"):
        torch.ops.dsf.decode_layer_bound(x, w, 1e-5, w, 1e-5, h, *args, 5, 2, 0.1)
    with pytest.raises(RuntimeError, match="q, k, v map 33 features"):
        torch.ops.dsf.decode_layer_bound(x, w, 1e-5, w, 1e-5, h, *args, 4, 2, 0.1)


def _plan(**ns):
    names = dict(zip(("zb", "yb", "ab", "zf", "af", "zd", "yd", "zn", "an"), cpu_bitmap.PLAN_CANDIDATES))
    return cpu_bitmap.PathPlan({names[k]: v for k, v in ns.items()})


ZEN4 = dict(zb=605, yb=309, ab=355, zf=674, af=385, zd=275, yd=267, zn=2859, an=2249)  # stop 20's measurement


@pytest.mark.parametrize(
    "ns,expected",
    [
        # Zen 4: the 256-bit word variant, fp16 values and the nonzero path on AVX2
        (ZEN4, ("avx512-256", "avx2", "avx512-256", "avx2")),
        # a core with fast 512-bit expansion keeps the 512-bit forms
        (
            dict(zb=40, yb=58, ab=71, zf=42, af=70, zd=35, yd=51, zn=200, an=260),
            ("avx512", "avx512", "avx512", "avx512"),
        ),
        # no AVX512_BF16: no 256-bit variant to choose; AVX2 wins bf16 values if faster
        (
            dict(zb=80, yb=None, ab=71, zf=90, af=70, zd=None, yd=None, zn=200, an=190),
            ("avx2", "avx2", "avx512", "avx2"),
        ),
    ],
)
def test_the_plan_picks_the_fastest_variant(monkeypatch, ns, expected):
    monkeypatch.delenv("DSF_AVX512_WIDTH", raising=False)
    choice = _plan(**ns).choice()
    assert (choice["bf16"], choice["fp16"], choice["bf16 model"], choice["nonzeros"]) == expected


@pytest.mark.parametrize(
    "ns,expected",
    [
        ({}, None),  # no AMX: nothing timed
        ({"amx tiles": 90.0, "avx512 nonzeros": 100.0, "avx2 nonzeros": 120.0}, 16),
        ({"amx tiles": 110.0, "avx512 nonzeros": 100.0, "amx tiles 64": 150.0, "avx512 nonzeros 64": 300.0}, 64),
        ({"amx tiles": 110.0, "avx2 nonzeros": 100.0, "amx tiles 64": 350.0, "avx512 nonzeros 64": 300.0}, 0),
    ],
)
def test_the_plan_starts_the_tile_path_where_it_timed_it_faster(ns, expected):
    assert cpu_bitmap.PathPlan(ns).start_batch("amx") == expected
    pairs = {k.replace("amx tiles", "avx512 pairs"): v for k, v in ns.items()}
    assert cpu_bitmap.PathPlan(pairs).start_batch("pairs") == expected
    assert cpu_bitmap.PathPlan(pairs).start_batch("amx") is None


def test_the_width_setting_overrides_the_plan_and_is_checked(monkeypatch):
    plan = _plan(**ZEN4)
    assert plan.choice("512") == {"bf16": "avx512", "fp16": "avx512", "bf16 model": "avx512", "nonzeros": "avx512"}
    assert plan.choice("256") == {"bf16": "avx512-256", "fp16": "avx2", "bf16 model": "avx512-256", "nonzeros": "avx2"}
    no_bf16 = _plan(zb=40, yb=None, ab=71, zf=42, af=70, zd=None, yd=None, zn=200, an=260)
    assert no_bf16.choice("256")["bf16"] == "avx2"  # no 256-bit AVX-512 variant: the AVX2 path
    monkeypatch.setenv("DSF_AVX512_WIDTH", "ymm")
    with pytest.raises(ValueError, match="DSF_AVX512_WIDTH must be auto, 512 or 256, not 'ymm'"):
        plan.choice()


@needs_avx512
@pytest.mark.parametrize("value_dtype", [torch.float16, torch.bfloat16])
def test_each_factor_takes_its_own_kinds_choice(monkeypatch, value_dtype):
    """A plan with bf16 values on the 256-bit variant and fp16 values on the 512-bit path:
    an fp16 factor must not be handed the variant (which has no fp16 form), and bf16
    factors on it switch to the nonzero path at its own batch."""
    if not cpu_bitmap.has_path("avx512-bf16"):
        pytest.skip("this CPU has no AVX512_BF16")
    monkeypatch.delenv("DSF_AVX512_WIDTH", raising=False)
    monkeypatch.delenv("DSF_NZ_MIN_BATCH", raising=False)
    monkeypatch.setenv("DSF_ROUND_X", "off")  # fp32 x on the word and nonzero paths
    monkeypatch.setattr(cpu_bitmap, "_PLAN", _plan(**{**ZEN4, "zf": 40}))
    monkeypatch.setattr(cpu_bitmap, "_PLANNED", True)
    shape = (70, 200)
    tensors = get_format("bitmap").pack(random_sparse(*shape, 0.3), value_dtype)
    p = backend.prepare("bitmap", tensors, shape, torch.float32)
    bf16 = value_dtype == torch.bfloat16
    assert p.paths.isa == "avx512-vbmi2" and p.paths.ymm == bf16 and p.paths.nz_isa == "avx2"
    assert p.paths.nz_min_batch == cpu_bitmap.NZ_MIN_BATCH["avx512-vbmi2 ymm" if bf16 else "avx512-vbmi2"]
    ref_w = get_format("bitmap").unpack(tensors, shape).double()
    for batch in (3, 20):  # the word path, then the (AVX2) nonzero path
        x = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(1))
        ref = x.double() @ ref_w.t()
        assert float((backend.matmul(p, x).double() - ref).abs().max() / ref.abs().max()) < 1e-4
