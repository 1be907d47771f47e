"""Layer benchmark: one linear layer's y = W x at decode-like batch sizes, dense vs
DSF (y = L (R x)) on every CPU backend, with weights rotated through more memory
than the last-level cache holds so that the numbers measure memory, not cache.

Reports the median seconds per call (the implementations take turns in short bursts,
so their ratios are measured over the same stretch of time), the bytes each call reads, the achieved GB/s
and its share of the machine's memory bandwidth, measured in the same run by
copying a large buffer.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dsf_runtime.benchmarks.storage import random_dsf_pair
from dsf_runtime.checkpoint import DEFAULT_VALUE_DTYPE, VALUE_DTYPES
from dsf_runtime.formats import get_format
from dsf_runtime.kernels import BACKENDS

SHAPES = {
    "llama7b-qkvo 4096x4096": (4096, 4096),
    "llama7b-up 11008x4096": (11008, 4096),
    "llama7b-down 4096x11008": (4096, 11008),
    "smollm2-q 576x576": (576, 576),
    "smollm2-up 1536x576": (1536, 576),
    "smollm2-down 576x1536": (576, 1536),
}
ROTATE_BYTES = 1536 * 2**20  # > 3x a 480 MiB last-level cache


@dataclass
class Case:
    name: str
    fn: Callable[[int, torch.Tensor], torch.Tensor]  # (copy index, x) -> y
    weight_bytes: int  # bytes one call reads from the weights
    copies: int
    bytes_at: Callable[[int], int] | None = None  # batch -> weight bytes, where the kernel's path depends on it
    path_at: Callable[[int], str] | None = None  # batch -> the kernel path each factor takes

    def path_for(self, batch: int) -> str:
        return "" if self.path_at is None else self.path_at(batch)

    def bytes_for(self, batch: int) -> int:
        return self.weight_bytes if self.bytes_at is None else self.bytes_at(batch)


def memory_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best GB/s of streaming a large buffer: a copy (read + write counted) or a
    read-only reduction, whichever is faster. Kernels here mostly read, so this is
    the physical limit their GB/s is compared with."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = max(best, 2 * nbytes / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        src.sum()
        best = max(best, nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def _copies(nbytes: int) -> int:
    return max(2, -(-ROTATE_BYTES // max(1, nbytes)))


def _paths(backend, pair: tuple, bf16_x: bool = False) -> Callable[[int], str]:
    """batch -> the cpu-bitmap kernel path of each factor of a prepared (L, R) pair, R first
    (the order they run in)."""
    return lambda batch: "; ".join(
        f"{name}: {backend.path_at(p, batch, bf16_x)}" for name, p in (("R", pair[1]), ("L", pair[0]))
    )


def _streamed(backend, pair: tuple) -> Callable[[int], int]:
    """batch -> bytes the cpu-bitmap kernel reads for a prepared (L, R) pair: its path,
    and so what it reads, depends on the batch."""
    return lambda batch: sum(backend.streamed_bytes(p, batch) for p in pair)


def build_cases(out_f: int, in_f: int, sparsity: float = 0.5) -> list[Case]:
    """Dense fp32/bf16 and DSF on each backend for one layer shape."""
    import scipy.sparse as sp

    W = torch.randn(out_f, in_f) * 0.02
    L, R = random_dsf_pair(out_f, in_f, sparsity)
    value_dtype = VALUE_DTYPES[DEFAULT_VALUE_DTYPE]  # what a new checkpoint stores
    cases = []

    n = _copies(W.numel() * 4)
    dense32 = [W.clone() for _ in range(n)]
    cases.append(Case("dense fp32", lambda i, x: torch.nn.functional.linear(x, dense32[i]), W.numel() * 4, n))
    n = _copies(W.numel() * 2)
    dense16 = [W.to(torch.bfloat16) for _ in range(n)]
    cases.append(
        Case(
            "dense bf16",
            lambda i, x: torch.nn.functional.linear(x.to(torch.bfloat16), dense16[i]).float(),
            W.numel() * 2,
            n,
        )
    )

    for backend_name, fmt in (("torch-csr", "csr"), ("cpu-bitmap", "bitmap")):
        backend = BACKENDS[backend_name]
        if not backend.available():
            continue
        f = get_format(fmt)
        tl, tr = f.pack(L, value_dtype), f.pack(R, value_dtype)
        pl = backend.prepare(fmt, tl, tuple(L.shape), torch.float32)
        pr = backend.prepare(fmt, tr, tuple(R.shape), torch.float32)
        # What the kernel streams per call: the prepared operands (CSR holds fp32 values
        # and int32 indices in memory; the bitmap kernel its stored tensors).
        if backend_name == "torch-csr":
            nbytes = sum(
                t.numel() * t.element_size()
                for p in (pl, pr)
                for t in (p.matrix.crow_indices(), p.matrix.col_indices(), p.matrix.values())
            )
        else:
            nbytes = sum(t.numel() * t.element_size() for t in (*tl.values(), *tr.values()))
        n = _copies(nbytes)
        preps = [
            (
                backend.prepare(fmt, {k: v.clone() for k, v in tl.items()}, tuple(L.shape), torch.float32),
                backend.prepare(fmt, {k: v.clone() for k, v in tr.items()}, tuple(R.shape), torch.float32),
            )
            for _ in range(n)
        ]
        cases.append(
            Case(
                f"DSF {backend_name}",
                lambda i, x, b=backend, p=preps: b.matmul(p[i][0], b.matmul(p[i][1], x)),
                nbytes,
                n,
                _streamed(backend, preps[0]) if backend_name == "cpu-bitmap" else None,
                _paths(backend, preps[0]) if backend_name == "cpu-bitmap" else None,
            )
        )

    bitmap = BACKENDS["cpu-bitmap"]
    if bitmap.available():
        f = get_format("bitmap")

        def bitmap_copies(tl: dict, tr: dict, model_dtype: torch.dtype) -> tuple[list, int, int]:
            """Prepared (L, R) copies enough to rotate beyond the LLC, their count and bytes."""
            nbytes = sum(t.numel() * t.element_size() for t in (*tl.values(), *tr.values()))
            n = _copies(nbytes)
            return (
                [
                    tuple(
                        bitmap.prepare("bitmap", {k: v.clone() for k, v in t.items()}, tuple(m.shape), model_dtype)
                        for t, m in ((tl, L), (tr, R))
                    )
                    for _ in range(n)
                ],
                n,
                nbytes,
            )

        def bitmap_case(name: str, fn: Callable, preps: list, n: int, nbytes: int, bf16_x: bool = False) -> Case:
            return Case(name, fn, nbytes, n, _streamed(bitmap, preps[0]), _paths(bitmap, preps[0], bf16_x))

        def two_stage(i: int, x: torch.Tensor, p: list) -> torch.Tensor:
            return bitmap.matmul(p[i][0], bitmap.matmul(p[i][1], x))

        # int8 values with per-row scales: 0.75 instead of 1.25 bytes per dense weight
        preps, n, nbytes = bitmap_copies(f.pack(L, torch.int8), f.pack(R, torch.int8), torch.float32)
        cases.append(bitmap_case("DSF cpu-bitmap int8", lambda i, x, p=preps: two_stage(i, x, p), preps, n, nbytes))
        # fp16 values (--value-dtype float16) in an fp32 model: the same bytes as the default
        # bf16 values, 3 more mantissa bits, widened by vcvtph2ps on AVX2
        preps, n, nbytes = bitmap_copies(f.pack(L, torch.float16), f.pack(R, torch.float16), torch.float32)
        cases.append(
            bitmap_case("DSF cpu-bitmap fp16 values", lambda i, x, p=preps: two_stage(i, x, p), preps, n, nbytes)
        )
        tl, tr = f.pack(L, torch.bfloat16), f.pack(R, torch.bfloat16)
        # a bf16 model: bf16 values and activations, as dense bf16 (the AVX512_BF16 dot-product
        # path where the CPU has it; elsewhere x is widened to fp32 and the values expand to fp32)
        preps, n, nbytes = bitmap_copies(tl, tr, torch.bfloat16)
        cases.append(
            bitmap_case(
                "DSF cpu-bitmap bf16 model",
                lambda i, x, p=preps: two_stage(i, x.to(torch.bfloat16), p).float(),
                preps,
                n,
                nbytes,
                bf16_x=True,
            )
        )

        # one pruned matrix at the same 50% (SparseGPT/Wanda/magnitude, or an imported
        # compressed-tensors sparse-bitmask or pruned dense model): W with half its weights zeroed
        pruned = W * (torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) >= sparsity)
        tp = f.pack(pruned, value_dtype)
        nbytes = sum(t.numel() * t.element_size() for t in tp.values())
        n = _copies(nbytes)
        single = [
            bitmap.prepare("bitmap", {k: v.clone() for k, v in tp.items()}, tuple(W.shape), torch.float32)
            for _ in range(n)
        ]
        cases.append(
            Case(
                "pruned 50% cpu-bitmap",
                lambda i, x, p=single: bitmap.matmul(p[i], x),
                nbytes,
                n,
                lambda batch, p=single[0]: bitmap.streamed_bytes(p, batch),
                lambda batch, p=single[0]: f"W: {bitmap.path_at(p, batch, False)}",
            )
        )

    sl, sr = sp.csr_matrix(L.numpy()), sp.csr_matrix(R.numpy())
    nbytes = sum(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes for m in (sl, sr))
    n = _copies(nbytes)
    mats = [(sl.copy(), sr.copy()) for _ in range(n)]
    cases.append(
        Case(
            "DSF scipy-csr",
            lambda i, x, m=mats: torch.from_numpy((m[i][0] @ (m[i][1] @ x.numpy().T)).T.copy()),
            nbytes,
            n,
        )
    )
    return cases


def time_cases(
    cases: list[Case],
    x: torch.Tensor,
    min_calls: int = 24,
    min_seconds: float = 1.0,
    max_calls: int = 400,
    burst: int = 6,
) -> list[float]:
    """Median seconds per call of each case, the cases taking turns in short bursts so
    that every case is timed over the same stretch of time: on a shared or throttled
    machine the speed drifts by tens of percent from one second to the next, and timing
    the cases one after another would put that drift into their ratios. Each burst
    starts with one untimed call: a call right after another implementation's is slowed
    by the switch (the DSF kernel by ~10% after a dense matmul on the AVX2 machine),
    and repeated calls of one layer are what a benchmark of that layer measures."""
    for case in cases:  # warm-up: touches every copy once
        for i in range(case.copies):
            case.fn(i, x)
    times: list[list[float]] = [[] for _ in cases]
    calls = [0] * len(cases)
    start, turn = time.perf_counter(), 0
    while True:
        order = range(len(cases)) if turn % 2 == 0 else reversed(range(len(cases)))  # no case always first
        for c in order:
            case = cases[c]
            for j in range(burst):
                t0 = time.perf_counter()
                case.fn(calls[c] % case.copies, x)
                if j:
                    times[c].append(time.perf_counter() - t0)
                calls[c] += 1
        turn += 1
        n = len(times[0])
        if (n >= min_calls and time.perf_counter() - start >= min_seconds * len(cases)) or n >= max_calls:
            return [statistics.median(t) for t in times]


def run_layer_bench(
    shapes: dict[str, tuple[int, int]] | None = None,
    batches: tuple[int, ...] = (1, 4, 16),
    out_dir: str = "benchmarks/results",
    sparsity: float = 0.5,
    progress: bool = True,
) -> dict:
    from dsf_runtime.benchmarks.results_io import environment, markdown_table, plot_speedups, write_results
    from dsf_runtime.kernels.cpu_bitmap import CPUBitmapBackend

    shapes = shapes or SHAPES
    bandwidth = memory_bandwidth()
    rows = []
    with torch.inference_mode():
        for label, (out_f, in_f) in shapes.items():
            cases = build_cases(out_f, in_f, sparsity)
            for batch in batches:
                x = torch.randn(batch, in_f)
                base = {}
                for case, sec in zip(cases, time_cases(cases, x)):
                    weight_bytes = case.bytes_for(batch)
                    gbs = (weight_bytes + x.numel() * 4) / sec / 1e9
                    base[case.name] = sec
                    rows.append(
                        {
                            "shape": label,
                            "batch": batch,
                            "impl": case.name,
                            "ms": sec * 1e3,
                            "weight_mib": weight_bytes / 2**20,
                            "gb_s": gbs,
                            "pct_bw": 100 * gbs / bandwidth,
                            "path": case.path_for(batch),
                        }
                    )
                for r in rows[-len(cases) :]:
                    r["speedup_vs_fp32"] = base["dense fp32"] / (r["ms"] / 1e3)
                    r["speedup_vs_bf16"] = base["dense bf16"] / (r["ms"] / 1e3)
                if progress:
                    best = min(rows[-len(cases) :], key=lambda r: r["ms"])
                    print(f"{label} batch {batch}: fastest {best['impl']} {best['ms']:.3f} ms", flush=True)
            del cases
    env = environment()
    env["memory_bandwidth_gb_s"] = bandwidth
    env["cpu_kernel_isa"] = CPUBitmapBackend().describe() if BACKENDS["cpu-bitmap"].available() else "unavailable"
    payload = {"benchmark": "layer", "sparsity": sparsity, "environment": env, "rows": rows}
    table = (
        f"memory bandwidth (best of buffer copy and read-only sum, same run): {bandwidth:.1f} GB/s; cpu-bitmap ISA: {env['cpu_kernel_isa']}\n\n"
        + markdown_table(
            rows,
            [
                ("shape", "layer", ""),
                ("batch", "batch", "d"),
                ("impl", "implementation", ""),
                ("ms", "ms", ".3f"),
                ("weight_mib", "weight MiB", ".1f"),
                ("gb_s", "GB/s", ".1f"),
                ("pct_bw", "% of bw", ".0f"),
                ("speedup_vs_fp32", "x vs fp32", ".2f"),
                ("speedup_vs_bf16", "x vs bf16", ".2f"),
                ("path", "kernel path", ""),
            ],
        )
    )
    paths = write_results(Path(out_dir), "layer", payload, table)
    plot_speedups(
        rows,
        Path(out_dir) / "layer.png",
        "speedup_vs_fp32",
        "speed-up vs dense fp32",
        "DSF 50% layer vs dense (weights rotated beyond the LLC)",
    )
    paths["png"] = Path(out_dir) / "layer.png"
    payload["files"] = {k: str(v) for k, v in paths.items()}
    payload["table"] = table
    return payload
