"""cpu-bitmap: a fast CPU kernel for the bitmap format (C++, AVX-512 or AVX2 with a
portable fallback, OpenMP over rows), compiled on first use and cached.

With AVX-512 VBMI2, below its NZ_MIN_BATCH it expands each 32-column bitmap word's packed
fp16/bf16 values into vector lanes (vpexpandw) and fuses multiply-adds with x for
tiles of up to 16 batch rows, so the kernel reads 1 bit per weight plus the nonzero
values once per tile (bf16 models: bf16 dot products where the CPU has AVX512_BF16);
from that batch on, and on the portable path, it iterates nonzeros against x laid
out [in][batch]. The word path's 256-bit variant (bf16 values, AVX512_BF16) expands
each word as two 16-column halves and multiplies them (vdpbf16ps) with x carried as
two bf16 parts, hi + lo (16 significant bits); a timing on first use (PathPlan) picks,
per value kind, whichever word path runs faster on this CPU: on AMD Zen 4, whose 512-bit
expand and widening ops are double-pumped, the variant for bf16 values and the AVX2
path for fp16 values. CPUs with AVX2 (+FMA, F16C) but no AVX-512 take the same two paths
with 8-lane vectors, expanding each 8-column bitmap byte through a vpshufb table
(the SparAMX technique's AVX2 form). On AVX2, factors at most COLUMNS_MAX_DENSITY dense
(DSF's square factors are 16%) also get each nonzero's column decoded once at load, and
batch-1 calls gather x through those instead: the byte expansion costs the same per 8
columns whatever they hold, so at low density it costs more per nonzero than the
gather. Where no C++ compiler is found (or the build fails) the
backend reports itself unavailable and ``auto`` picks torch-csr instead; the reason
is in ``unavailable_reason()``.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass, field

import torch

from dsf_runtime import settings
from dsf_runtime.formats import bitmap as bitmap_format
from dsf_runtime.formats import get_format
from dsf_runtime.kernels import cpu_ops, register_backend, tuning
from dsf_runtime.units import format_bytes

log = logging.getLogger(__name__)

# Thresholds measured per instruction path (kernels/tuning.json says how); the DSF_*
# settings override them. From NZ_MIN_BATCH on, the vector paths iterate nonzeros (x as
# [in][batch]) instead of expanding bitmap words. On AVX2, factors at most
# COLUMNS_MAX_DENSITY dense get each nonzero's column decoded once at load (2 bytes per
# nonzero more in memory), and batches up to COLUMNS_MAX_BATCH gather x through them
# instead of expanding bitmap bytes (whose cost is per 8 columns, not per nonzero).
NZ_MIN_BATCH: dict[str, int] = tuning.cpu()["nz_min_batch"]
# Factors of at least LARGE_FACTOR_CELLS cells switch at NZ_MIN_BATCH_LARGE where an ISA has it.
NZ_MIN_BATCH_LARGE: dict[str, int] = tuning.cpu()["nz_min_batch_large"]
LARGE_FACTOR_CELLS: int = tuning.cpu()["large_factor_cells"]
COLUMNS_MAX_DENSITY: float = tuning.cpu()["columns_max_density"]
COLUMNS_MAX_BATCH: dict[str, int] = tuning.cpu()["columns_max_batch"]
# From this batch on, bf16 factors take the AMX tile path where the CPU has one.
TILES_MIN_BATCH: int = tuning.cpu()["tiles_min_batch"]
# From this batch on, fp32 x of bf16 factors is rounded to bf16 for the AVX512_BF16 dot path.
ROUND_X_MIN_BATCH: int = tuning.cpu()["round_x_min_batch"]


def nz_min_batch(isa: str, cells: int = 0) -> int:
    """The batch from which ``isa``'s nonzero path runs for a factor of ``cells`` cells
    (rows x cols); DSF_NZ_MIN_BATCH overrides."""
    value = settings.get("DSF_NZ_MIN_BATCH")
    if value is not None:
        return value
    if cells >= LARGE_FACTOR_CELLS and isa in NZ_MIN_BATCH_LARGE:
        return NZ_MIN_BATCH_LARGE[isa]
    return NZ_MIN_BATCH.get(isa, 1)


def columns_max_density() -> float:
    """Density up to which prepare() builds column indices (DSF_COLUMNS_MAX_DENSITY overrides; 0: never)."""
    value = settings.get("DSF_COLUMNS_MAX_DENSITY")
    return COLUMNS_MAX_DENSITY if value is None else value


def columns_max_batch(isa: str) -> int:
    """The largest batch that ``isa``'s column-index path takes (DSF_COLUMNS_MAX_BATCH overrides; 0: never)."""
    value = settings.get("DSF_COLUMNS_MAX_BATCH")
    return COLUMNS_MAX_BATCH.get(isa, 0) if value is None else value


def tiles_min_batch() -> int:
    """The batch from which bf16 factors take the tile path (AMX, or the AVX512_BF16 pair
    path): DSF_AMX_MIN_BATCH, else where the plan timed it faster than the nonzero path on
    this CPU (0: never), else the tuning default (the emulated tiles)."""
    value = settings.get("DSF_AMX_MIN_BATCH")
    if value is not None:
        return value
    path = tile_path()
    measured = _measured_start(path) if path in _TIMED_TILES else None
    return TILES_MIN_BATCH if measured is None else measured


# The tile paths the plan times.
_TIMED_TILES = ("amx", "pairs")
_TILE_CHECK: dict[str, bool] = {}  # tile path -> whether it matched the emulated tiles on this CPU


def _measured_start(path: str) -> int | None:
    """Where the plan starts ``path`` (amx or pairs) on this CPU; None where it timed neither."""
    plan = path_plan() if has_path("avx512-vbmi2") else None
    return plan.start_batch(path) if plan is not None else None


def tile_path() -> str:
    """The tile path bf16 factors take from tiles_min_batch() on: "amx" where the CPU has
    AMX (unless DSF_AMX=off), the plan times it faster than the nonzero path and a first
    call matches the emulated tiles; else "pairs" (AVX512_BF16: vdpbf16ps on the column
    pairs that hold a nonzero) where the CPU has it and the plan times it faster (not with
    DSF_ROUND_X=off or a narrower DSF_CPU_ISA); "amx-emulated" with DSF_AMX=emulate
    (scalar; for tests); else "none"."""
    mode = settings.get("DSF_AMX")
    if not build():
        return "none"
    if mode == "emulate":
        return "amx-emulated" if has_path("tiles-emulated") else "none"
    if mode != "off" and has_path("amx") and _measured_start("amx") != 0:
        if "amx" not in _TILE_CHECK:
            _TILE_CHECK["amx"] = _tiles_agree()
        if _TILE_CHECK["amx"]:
            return "amx"
    if rounds_x() and has_path("avx512-bf16") and settings.get("DSF_CPU_ISA") is None and _measured_start("pairs"):
        return "pairs"
    return "none"


def rounds_x() -> bool:
    """Whether paths that multiply in bf16 may take fp32 x rounded to bf16 (DSF_ROUND_X)."""
    return settings.get("DSF_ROUND_X") != "off"


def _tiles_agree() -> bool:
    """Whether the AMX tile path computes what the emulated tiles compute on a random bf16
    factor with row and batch tails (once per process; a mismatch turns the path off with
    a warning rather than let it give wrong answers)."""
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(45, 300, generator=g) * (torch.rand(45, 300, generator=g) < 0.3)
    tensors = get_format("bitmap").pack(dense, torch.bfloat16)
    factor = [tensors["bitmap"], tensors["row_offsets"], tensors["values"], torch.empty(0), _NO_COLUMNS]
    x = torch.randn(37, 300, generator=g)
    base = [0, 0, 1 << 30, 0, 0]
    try:
        got = cpu_ops.ops().bitmap_spmm(x, factor, 300, base + [_TILE_CODES["amx"], 1])
    except RuntimeError as exc:
        log.warning("the AMX tile path failed its check (%s); bf16 factors run the vector paths", exc)
        return False
    want = cpu_ops.ops().bitmap_spmm(x, factor, 300, base + [_TILE_CODES["amx-emulated"], 1])
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())):
        log.warning(
            "the AMX tile path disagrees with the emulated tiles on this CPU; bf16 factors run the vector paths"
        )
        return False
    return True


def amx_reason() -> str:
    """Why this machine has no AMX tile path ("" where it has one): no AMX in the CPU, the
    OS not enabling tile state, or Linux refusing the process the tile-data permission
    (the library asks for it once); the library's build failure where it did not build."""
    if not build():
        return f"the CPU kernel did not build: {unavailable_reason()}"
    return str(cpu_ops.ops().amx_reason())


# How amx_reason() starts where the machine has no AMX hardware at all (csrc/amx.cpp,
# csrc/ops.cpp); any other reason (an AMX CPU whose OS or process cannot use it) is worth
# telling users.
_NO_AMX_HARDWARE = "the CPU has no AMX"


_REASON: str | None = None
_LOADED = False
_PATHS: frozenset[str] = frozenset()  # the op library's paths on this CPU (cpu_paths), read once at build
find_compiler = cpu_ops.find_compiler


def has_path(name: str) -> bool:
    """Whether this CPU runs the library's ``name`` path: amx, avx512-vbmi2, avx512-bf16,
    avx2, portable, or tiles-emulated (the tile path in scalar code, x86 builds)."""
    return name in _PATHS


def build() -> bool:
    """Build (once per source, cached) and load the kernels' torch ops; False (with the
    reason in unavailable_reason()) where that fails."""
    global _LOADED, _REASON, _PATHS, _PLAN, _PLANNED
    if _LOADED:
        return True
    try:
        cpu_ops.load()
    except cpu_ops.BuildError as exc:
        _REASON = str(exc)
        log.warning(_REASON)
        return False
    _PATHS = frozenset(cpu_ops.ops().cpu_paths())
    _ISA_CACHE.clear()
    with _PLAN_LOCK:
        _PLAN, _PLANNED = None, False  # measured on first use (path_plan)
    _LOADED, _REASON = True, None
    bitmap_format.set_native_check(check_bitmap)  # checkpoint validation uses the one-pass native check
    return True


# On AVX-512 CPUs the paths' variants are timed once per process (csrc/plan.cpp: a
# synthetic factor, ~0.12 s; the ``plan_paths`` op), when a factor with fp16 or bf16 values is first prepared or
# the backend described: a process that only checks availability or runs int8 factors does
# not pay for it. Which variant is faster depends on the microarchitecture.
# On AMD Zen 4, at batch 1, the 512-bit word path ran 2.0x slower than its 256-bit
# variant (vpexpandw zmm and 512-bit widening are double-pumped there) and for fp16
# values (which have no 256-bit variant) 2.0x slower than the AVX2 path; at batch 16 the
# AVX-512 nonzero path ran 1.05-1.4x slower than the AVX2 one (improved over stops 17-19).
# On the Intel core of the project's first sessions the 512-bit word path met the batch-1
# targets. DSF_AVX512_WIDTH=512 or =256 overrides the measurement: 512 runs the 512-bit
# forms, 256 the 256-bit variant for bf16 values and the AVX2 paths for the rest.
PLAN_CANDIDATES = (
    "avx512 bf16",
    "avx512-256 bf16",
    "avx2 bf16",
    "avx512 fp16",
    "avx2 fp16",
    "avx512 bf16 model",
    "avx512-256 bf16 model",
    "avx512 nonzeros",
    "avx2 nonzeros",
    "amx tiles",
    "amx tiles 64",
    "avx512 pairs",
    "avx512 pairs 64",
    "avx512 nonzeros 64",
)
_WIDTHS = ("auto", "512", "256")


@dataclass(frozen=True)
class PathPlan:
    """The measured time (ns per call on the planner's factor, word paths at batch 1 and
    nonzero paths at batch 16; None where the CPU lacks the instructions) of each of
    PLAN_CANDIDATES, and from them the variant each kind of call runs."""

    ns: dict[str, float | None]

    def _faster(self, a: str, b: str) -> bool:
        ta, tb = self.ns.get(a), self.ns.get(b)
        return ta is not None and (tb is None or ta < tb)

    def choice(self, setting: str | None = None) -> dict[str, str]:
        """The variant for the word path per value kind (bf16, fp16, bf16 model) and for
        the nonzero path (nonzeros): from the timings, or as DSF_AVX512_WIDTH
        (``setting``: auto, 512 or 256) says."""
        setting = settings.get("DSF_AVX512_WIDTH") if setting is None else setting
        if setting not in _WIDTHS:
            raise ValueError(f"DSF_AVX512_WIDTH must be auto, 512 or 256, not {setting!r}")
        has_256 = self.ns.get("avx512-256 bf16") is not None
        if setting == "512":
            return {"bf16": "avx512", "fp16": "avx512", "bf16 model": "avx512", "nonzeros": "avx512"}
        if setting == "256":
            return {
                "bf16": "avx512-256" if has_256 else "avx2",
                "fp16": "avx2",
                "bf16 model": "avx512-256" if has_256 else "avx512",
                "nonzeros": "avx2",
            }
        bf16 = "avx512-256" if self._faster("avx512-256 bf16", "avx512 bf16") else "avx512"
        if self._faster("avx2 bf16", f"{bf16} bf16"):
            bf16 = "avx2"
        return {
            "bf16": bf16,
            "fp16": "avx2" if self._faster("avx2 fp16", "avx512 fp16") else "avx512",
            "bf16 model": "avx512-256" if self._faster("avx512-256 bf16 model", "avx512 bf16 model") else "avx512",
            "nonzeros": "avx2" if self._faster("avx2 nonzeros", "avx512 nonzeros") else "avx512",
        }

    def start_batch(self, path: str) -> int | None:
        """The batch from which tile ``path`` (amx or pairs) beats the nonzero path on this
        CPU: 16 where it is faster at 16, 64 where only at 64, 0 where at neither; None
        where the CPU has no such path timed."""
        name = {"amx": "amx tiles", "pairs": "avx512 pairs"}[path]
        if self.ns.get(name) is None:
            return None
        nz16 = min(
            (t for t in (self.ns.get("avx512 nonzeros"), self.ns.get("avx2 nonzeros")) if t is not None), default=None
        )
        if nz16 is None or self.ns[name] < nz16:
            return 16
        return 64 if self._faster(f"{name} 64", "avx512 nonzeros 64") else 0


_PLAN: PathPlan | None = None
_PLANNED = False  # whether _PLAN was measured for the loaded library
_PLAN_LOCK = threading.Lock()


def _measure_plan() -> PathPlan:
    names, ns = cpu_ops.ops().plan_paths()
    timed = dict(zip(names, ns))
    return PathPlan({name: timed.get(name) for name in PLAN_CANDIDATES})


def path_plan() -> PathPlan | None:
    """This CPU's measured plan for the AVX-512 paths (None without AVX-512 or the kernel),
    timed on the first call after the library is loaded."""
    global _PLAN, _PLANNED
    built = build()
    with _PLAN_LOCK:
        if not _PLANNED:
            _PLAN = _measure_plan() if built and has_path("avx512-vbmi2") else None
            _PLANNED = True
        return _PLAN


def unavailable_reason() -> str | None:
    build()
    return _REASON


_CHECK_MESSAGES = {
    1: "row_offsets are not monotone",
    2: "bitmap popcounts do not match row_offsets",
    3: "bitmap has bits set beyond the last column",
}


def check_bitmap(bitmap: torch.Tensor, offsets: torch.Tensor, cols: int, nnz: int) -> str | None | bool:
    """The bitmap format's structural checks in one native pass (load-time validation):
    None when they hold, else the problem in the words the torch checks use; False
    when the library is not built or the tensors are not laid out for it (the caller
    then runs the torch checks). Shapes and dtypes must have been checked already."""
    rows = offsets.numel() - 1
    if (
        not _LOADED
        or bitmap.dtype != torch.int32
        or offsets.dtype != torch.int32
        or bitmap.device.type != "cpu"
        or not bitmap.is_contiguous()
        or not offsets.is_contiguous()
        or rows < 0
        or bitmap.dim() != 2
        or bitmap.shape[0] != rows
        or bitmap.shape[1] * 32 < cols
    ):
        return False
    code = cpu_ops.ops().bitmap_check(bitmap, offsets, cols, nnz)
    if code == 0:
        return None
    if code < 0:
        return f"row_offsets must start at 0 and end at nnz={nnz}"
    return f"{_CHECK_MESSAGES[code % 4]} (row {code // 4})"


def bitmap_columns(p: Prepared) -> torch.Tensor:
    """The column of every nonzero of a prepared factor, row by row (uint16 bits in an
    int16 tensor): the column-index path's operand. Raises ValueError when the factor's
    bits do not match its offsets or lie past its columns, or it has over 65536 columns."""
    if (
        tuple(p.bitmap.shape) != (p.rows, p.words)
        or p.offsets.numel() != p.rows + 1
        or p.words * 32 < p.cols
        or p.bitmap.dtype != torch.int32
        or p.offsets.dtype != torch.int32
    ):
        raise ValueError(
            f"a {p.rows}x{p.cols} bitmap factor needs a ({p.rows}, {-(-p.cols // 32)}) int32 bitmap "
            f"and {p.rows + 1} int32 row offsets"
        )
    if not build():
        raise ValueError(f"cannot index a bitmap factor's columns: {_REASON}")
    try:
        columns = cpu_ops.ops().bitmap_columns(p.bitmap, p.offsets, p.cols)
    except RuntimeError as exc:
        raise ValueError(str(exc).splitlines()[0]) from None
    if columns.numel() != p.nvalues:
        raise ValueError(
            f"a {p.rows}x{p.cols} bitmap factor's row offsets count {columns.numel()} nonzeros, its values {p.nvalues}"
        )
    return columns


def _isa(forced: str | None) -> str:
    """The path for a DSF_CPU_ISA value (see CPUBitmapBackend.isa); remembered once built."""
    isa = _ISA_CACHE.get(forced)
    if isa is None:
        if not build() or forced == "portable":
            return "portable"  # not remembered: a later build may succeed
        isa = (
            "avx512-vbmi2"
            if has_path("avx512-vbmi2") and forced != "avx2"
            else "avx2"
            if has_path("avx2")
            else "portable"
        )
        _ISA_CACHE[forced] = isa
    return isa


_ISA_CACHE: dict[str | None, str] = {}

# Value kinds as the kernels number them.
KIND_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.int8: 2}
# Path codes of the ops' plan (csrc/ops.cpp): the same for its word and nonzero paths
# (word path 0 means none: the nonzero path at every batch, as the portable path runs).
_ISA_CODES = {"portable": 0, "avx2": 1, "avx512-vbmi2": 2}
_NO_COLUMNS = torch.empty(0, dtype=torch.int16)
_TILE_CODES = {"none": 0, "amx": 1, "amx-emulated": 2, "pairs": 3}


@dataclass(frozen=True)
class Paths:
    """Which kernel path a prepared factor takes per batch size, decided once at
    prepare() from the CPU and the DSF_* settings (a decode step makes hundreds of
    kernel calls; none reads the environment). ``CPUBitmapBackend.refresh`` re-reads them."""

    isa: str  # the instruction path for this factor's values (int8 values run AVX2's on AVX-512 CPUs;
    # fp16 values too where the plan measured AVX2's word path faster)
    nz_isa: str  # the nonzero path's instruction path (AVX-512 CPUs: the plan's choice; else ``isa``)
    nz_min_batch: int  # from this batch on, the nonzero path
    columns_max_batch: int  # up to this batch, the column-index path (0 unless AVX2 and the factor has its indices)
    bf16_dot: bool  # bf16 activations take the AVX512_BF16 dot-product path
    ymm: bool = False  # AVX-512 word path: the 256-bit variant (bf16 values: x split into bf16 parts)
    dot_ymm: bool = False  # the bf16 dot-product path's 256-bit variant
    tiles: str = "none"  # the tile path from tiles_min_batch on: none, amx, pairs, or amx-emulated (tests)
    tiles_min_batch: int = 0
    round_min_batch: int = 0  # from this batch on fp32 x takes the bf16 dot path, rounded (0: never)

    def codes(self) -> list[int]:
        """The ops' plan: [word path, nonzero path, nz_min_batch, columns_max_batch, dot path,
        tile path, tiles_min_batch, round_min_batch]."""
        word = 3 if self.isa == "avx512-vbmi2" and self.ymm else _ISA_CODES[self.isa]
        dot = (3 if self.dot_ymm else 2) if self.bf16_dot else 0
        tiles = _TILE_CODES[self.tiles]
        return [
            word,
            _ISA_CODES[self.nz_isa],
            self.nz_min_batch,
            self.columns_max_batch,
            dot,
            tiles,
            self.tiles_min_batch if tiles else 0,
            self.round_min_batch if dot else 0,
        ]


@dataclass
class Prepared:
    bitmap: torch.Tensor  # (rows, words) int32
    offsets: torch.Tensor  # (rows + 1,) int32
    values: torch.Tensor  # (nnz,) fp16, bf16 or int8, the module's own buffer (no copy)
    scales: torch.Tensor  # (rows,) fp32 row scales of int8 values; empty otherwise
    rows: int
    cols: int
    kind: int  # 0 fp16, 1 bf16, 2 int8
    columns: torch.Tensor | None = None  # (nnz,) int16 holding uint16 columns: the column-index path's operand
    paths: Paths | None = None  # set by CPUBitmapBackend.prepare (and refresh)
    # The ops' operands, built once: [bitmap, offsets, values, scales, columns or empty]
    # and the plan's codes (from ``paths``).
    tensors: list[torch.Tensor] = field(init=False, repr=False)
    plan: list[int] = field(init=False, repr=False, default_factory=list)
    # The operands bound in the op library (bitmap_bind), 0 before a plan exists: eager
    # calls pass this handle instead of the lists above (see bitmap_pair_bound).
    handle: int = field(init=False, repr=False, default=0)
    _release: weakref.finalize | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        self.sync()

    def sync(self) -> None:
        """Rebuild the ops' operands from the fields (after ``columns`` or ``paths`` change)."""
        self.tensors = [
            self.bitmap,
            self.offsets,
            self.values,
            self.scales,
            self.columns if self.columns is not None else _NO_COLUMNS,
        ]
        self.plan = self.paths.codes() if self.paths is not None else []
        self._bind()

    def _bind(self) -> None:
        """Bind the current operands (releasing any earlier binding); unbound when this
        object is collected."""
        if self._release is not None:
            self._release()
        self.handle, self._release = 0, None
        if self.plan and _LOADED:
            unbind = cpu_ops.ops().bitmap_unbind
            self.handle = cpu_ops.ops().bitmap_bind(self.tensors, self.cols, self.plan)
            self._release = weakref.finalize(self, unbind, self.handle)
            self._release.atexit = False  # the op library may be gone at interpreter exit

    def __getstate__(self) -> dict:
        # a copy binds its own operands: a shared handle would die with the original
        state = {k: v for k, v in self.__dict__.items() if k not in ("handle", "_release")}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.handle, self._release = 0, None
        self._bind()

    @property
    def nvalues(self) -> int:
        return self.values.numel()

    @property
    def words(self) -> int:
        return self.bitmap.shape[1]


@register_backend
class CPUBitmapBackend:
    name = "cpu-bitmap"
    formats = ("bitmap",)
    devices = ("cpu",)
    priority = 20  # preferred over torch-csr where it builds

    def available(self) -> bool:
        return build()

    def unavailable_reason(self) -> str | None:
        return unavailable_reason()

    def accepts(self, tensors: dict[str, torch.Tensor]) -> bool:
        values = tensors["values"].dtype
        return values in (torch.float16, torch.bfloat16) or (values == torch.int8 and "scales" in tensors)

    @property
    def isa(self) -> str:
        """The instruction path in use: avx512-vbmi2, avx2 or portable, the widest the
        CPU has; DSF_CPU_ISA=avx2 or =portable forces a narrower one (=avx512 keeps
        AVX-512 without the bf16 dot-product path). Raises ValueError on another value."""
        return _isa(settings.get("DSF_CPU_ISA"))

    @property
    def bf16_dot(self) -> bool:
        """Whether bf16 models take the AVX512_BF16 dot-product path (DSF_CPU_ISA=avx512 turns it off)."""
        return self.isa == "avx512-vbmi2" and settings.get("DSF_CPU_ISA") != "avx512" and has_path("avx512-bf16")

    def prepare(
        self, fmt: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype
    ) -> Prepared:
        values = tensors["values"]
        if not self.accepts(tensors):
            raise ValueError(f"cpu-bitmap needs fp16, bf16 or int8 (with row scales) values, got {values.dtype}")
        scales = tensors["scales"].float().contiguous() if values.dtype == torch.int8 else torch.empty(0)
        p = Prepared(
            tensors["bitmap"].contiguous(),
            tensors["row_offsets"].contiguous(),
            values.contiguous(),
            scales,
            shape[0],
            shape[1],
            KIND_CODES[values.dtype],
        )
        if (
            self._factor_isa(p.kind)[0] in COLUMNS_MAX_BATCH
            and 0 < p.cols <= 65536
            and p.rows
            and p.nvalues <= columns_max_density() * p.rows * p.cols
        ):
            p.columns = bitmap_columns(p)
        return self.refresh(p)

    def refresh(self, p: Prepared) -> Prepared:
        """Decide ``p``'s paths from the CPU and the DSF_CPU_ISA, DSF_NZ_MIN_BATCH and
        DSF_COLUMNS_MAX_BATCH settings now (prepare() does; call again after changing
        them). Raises ValueError on a bad setting. Returns ``p``."""
        isa, choice = self._factor_isa(p.kind)
        columns = columns_max_batch(isa)  # read (and checked) whatever the path
        ymm = isa == "avx512-vbmi2" and p.kind == 1 and choice.get("bf16") == "avx512-256"
        nz_isa = "avx2" if isa == "avx512-vbmi2" and choice.get("nonzeros") == "avx2" and has_path("avx2") else isa
        tiles = tile_path() if p.kind == 1 else "none"  # bf16 values only
        p.paths = Paths(
            isa,
            nz_isa,
            nz_min_batch(f"{isa} ymm" if ymm else isa, p.rows * p.cols),
            columns if isa == "avx2" and p.columns is not None else 0,
            self.bf16_dot,
            ymm=ymm,
            dot_ymm=choice.get("bf16 model") == "avx512-256",
            tiles=tiles,
            tiles_min_batch=tiles_min_batch() if tiles != "none" else 0,
            round_min_batch=ROUND_X_MIN_BATCH if p.kind == 1 and rounds_x() else 0,
        )
        p.sync()
        return p

    def _factor_isa(self, kind: int) -> tuple[str, dict[str, str]]:
        """The instruction path for a factor of value ``kind`` and, on AVX-512, the
        plan's choices (empty elsewhere)."""
        isa = self.isa
        if isa != "avx512-vbmi2":
            return isa, {}
        if kind == 2:
            return ("avx2" if has_path("avx2") else "portable"), {}  # int8 values run the AVX2 paths
        plan = path_plan()
        choice = plan.choice() if plan is not None else {}
        if choice.get("bf16" if kind == 1 else "fp16") == "avx2" and has_path("avx2"):
            return "avx2", choice
        return isa, choice

    def describe(self, operands: list | None = None) -> str:
        """The instruction path and, on AVX-512, the plan's choices (for `dsf info`,
        `dsf generate` and the benchmarks); with a model's prepared ``operands``, also the
        column indices built for its sparsest factors (memory beyond the checkpoint's)."""
        isa = self.isa
        plan = path_plan() if isa == "avx512-vbmi2" else None
        text = isa
        if plan is not None:
            choice = plan.choice()
            text = (
                f"{isa}; words: bf16 values {choice['bf16']}, fp16 values {choice['fp16']}; "
                f"nonzeros {choice['nonzeros']}"
            )
        if self.bf16_dot and rounds_x():
            text += f"; fp32 x on bf16 values in bf16 from batch {ROUND_X_MIN_BATCH}"
        tiles = tile_path()
        if tiles == "pairs":
            text += f"; avx512-bf16 pairs from batch {tiles_min_batch()} (bf16 values)"
        elif tiles != "none":
            text += f"; {tiles} tiles from batch {tiles_min_batch()} (bf16 values)"
        else:
            reason = amx_reason()
            if reason and not reason.startswith(_NO_AMX_HARDWARE):
                text += f"; no AMX tiles: {reason}"
        columns = [p.columns for p in operands or () if getattr(p, "columns", None) is not None]
        if columns:
            text += (
                f"; column index on {len(columns)} factors, "
                f"{format_bytes(sum(c.numel() * c.element_size() for c in columns))}"
            )
        return text

    @staticmethod
    def _takes_columns(p: Prepared, batch: int) -> bool:
        return batch <= p.paths.columns_max_batch

    def path_at(self, p: Prepared, batch: int, bf16_x: bool = False) -> str:
        """The kernel path a call with ``batch`` rows of x (bf16 x with ``bf16_x``, else fp32)
        takes, e.g. "words avx2" or "nonzeros avx512": the op's own choice (``bitmap_path``),
        for benchmark tables."""
        dtype = torch.bfloat16 if bf16_x else torch.float32
        return cpu_ops.ops().bitmap_path(batch, dtype, p.tensors, p.cols, p.plan)

    def streamed_bytes(self, p: Prepared, batch: int) -> int:
        """Bytes of the factor that one call with ``batch`` rows of x reads: its bitmap and
        values (int8: and row scales), or on the column-index path its row offsets, columns
        and values. Benchmarks report GB/s from this."""
        weights = p.values.numel() * p.values.element_size() + p.scales.numel() * p.scales.element_size()
        if self._takes_columns(p, batch):
            return weights + p.offsets.numel() * 4 + p.columns.numel() * 2
        return weights + p.bitmap.numel() * 4

    def matmul(self, p: Prepared, x: torch.Tensor) -> torch.Tensor:
        """x (n, cols) -> (n, rows) in x's dtype: the ``bitmap_spmm`` op on ``p``'s plan."""
        return torch.ops.dsf.bitmap_spmm(x, p.tensors, p.cols, p.plan)

    def pair(self, right: Prepared, left: Prepared, x: torch.Tensor) -> torch.Tensor:
        """L (R x) for x (..., right.cols) -> (..., left.rows) in one op: eager calls pass
        the bound operands' handles (``bitmap_pair_bound``), traced ones (torch.compile,
        torch.export) the operands themselves (``bitmap_pair``), so graphs stay portable."""
        if right.handle and left.handle and not torch.compiler.is_compiling():
            return torch.ops.dsf.bitmap_pair_bound.default(x, right.handle, left.handle, left.rows)
        h = x.reshape(-1, x.shape[-1])  # (N, cols)
        y = torch.ops.dsf.bitmap_pair(h, right.tensors, right.cols, right.plan, left.tensors, left.cols, left.plan)
        return y.reshape(*x.shape[:-1], left.rows)
