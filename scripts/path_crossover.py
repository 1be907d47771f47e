"""Where the cpu-bitmap backend should switch between its paths.

Word vs nonzero path (NZ_MIN_BATCH): times one DSF layer (random factors at DSF's
densities, rotated through more memory than the last-level cache) through
the backend with the nonzero path forced off and forced on, alternating call by call in
one process so that both see the same stretch of a shared host's time, per batch size
(--values picks fp16, bf16 or int8 stored values; fp16 by default):

    python scripts/path_crossover.py 4096x11008 8,10,12,16 --seconds 8

Word vs column-index path (COLUMNS_MAX_DENSITY, COLUMNS_MAX_BATCH; AVX2): with
--columns, one OUTxIN factor per density given (uniform random mask), the column-index
path forced off and on:

    python scripts/path_crossover.py 4096x4096 1,2,3 --columns 0.12,0.16,0.2,0.25

Prints each path's median ms per call and their ratio (nz/word or cols/word); the
constants in dsf_runtime/kernels/cpu_bitmap.py are set from where that ratio crosses 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from dsf_runtime.benchmarks.storage import random_dsf_pair
from dsf_runtime.formats import get_format
from dsf_runtime.kernels import BACKENDS

# The environment forcing each path: (the path, its baseline) per mode.
NZ_PATHS = {"word": {"DSF_NZ_MIN_BATCH": "1000000000"}, "nz": {"DSF_NZ_MIN_BATCH": "1"}}
COLUMN_PATHS = {"word": {"DSF_COLUMNS_MAX_BATCH": "0"}, "cols": {"DSF_COLUMNS_MAX_BATCH": "1000000000"}}
VALUE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
FORCED = ("DSF_NZ_MIN_BATCH", "DSF_COLUMNS_MAX_BATCH", "DSF_COLUMNS_MAX_DENSITY")


def alternate(
    paths: dict[str, dict[str, str]], call: Callable[[int], object], seconds: float, refresh: Callable[[int], object]
) -> dict[str, float]:
    """Median seconds of ``call(i)`` (i: the call's number) under each path's environment,
    the paths taking turns call by call (their order flipping each round). The backend
    decides paths when a factor is prepared: ``refresh(i)`` (untimed) makes call i's
    factors re-read the environment."""
    times: dict[str, list[float]] = {p: [] for p in paths}
    names = list(paths)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for path in names if calls % 2 else names[::-1]:
            os.environ.update(paths[path])
            refresh(calls)
            t0 = time.perf_counter()
            call(calls)
            times[path].append(time.perf_counter() - t0)
        calls += 1
    return {p: statistics.median(t) for p, t in times.items()} | {"calls": calls}


def _copies(packed: list[dict[str, torch.Tensor]], rotate_mib: int) -> int:
    nbytes = sum(t.numel() * t.element_size() for p in packed for t in p.values())
    return max(1, -(-rotate_mib * 2**20 // nbytes))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", help="OUTxIN of the dense layer (with --columns: of the factor)")
    ap.add_argument("batches", help="comma-separated batch sizes")
    ap.add_argument(
        "--columns", metavar="DENSITIES", help="comma-separated factor densities: time the column-index path instead"
    )
    ap.add_argument("--values", choices=sorted(VALUE_DTYPES), default="fp16", help="stored values (default fp16)")
    ap.add_argument("--seconds", type=float, default=8.0, help="per batch size (and density)")
    ap.add_argument("--rotate-mib", type=int, default=512)
    args = ap.parse_args(argv)
    try:
        out_f, in_f = (int(s) for s in args.shape.lower().split("x"))
        batches = [int(b) for b in args.batches.split(",")]
        densities = [float(d) for d in args.columns.split(",")] if args.columns else []
    except ValueError:
        ap.error("shape is OUTxIN (e.g. 4096x4096), batches comma-separated integers, densities numbers")
    if min(batches) < 1 or out_f < 1 or in_f < 1:
        ap.error("sizes and batches must be positive")
    if any(not 0 < d <= 1 for d in densities):
        ap.error("densities must lie in (0, 1]")
    backend = BACKENDS["cpu-bitmap"]
    if not backend.available() or backend.isa == "portable":
        raise SystemExit("path_crossover: the cpu-bitmap kernel has no vector path on this machine")
    if densities and backend.isa != "avx2":
        raise SystemExit(f"path_crossover: the column-index path is AVX2's; this CPU runs {backend.isa}")
    fmt = get_format("bitmap")
    saved = {k: os.environ.get(k) for k in FORCED}
    try:
        if not densities:
            L, R = random_dsf_pair(out_f, in_f, 0.5)
            packed = [fmt.pack(m, VALUE_DTYPES[args.values]) for m in (L, R)]
            copies = _copies(packed, args.rotate_mib)
            preps = [
                [
                    backend.prepare("bitmap", {k: v.clone() for k, v in p.items()}, tuple(m.shape), torch.float32)
                    for p, m in zip(packed, (L, R))
                ]
                for _ in range(copies)
            ]
            print(f"{args.shape}: {args.values} values, {copies} copies, ISA {backend.isa}")
            for batch in batches:
                x = torch.randn(batch, in_f)
                t = alternate(
                    NZ_PATHS,
                    lambda i: backend.matmul(preps[i % copies][0], backend.matmul(preps[i % copies][1], x)),
                    args.seconds,
                    lambda i: [backend.refresh(p) for p in preps[i % copies]],
                )
                print(
                    f"{args.shape} batch {batch}: word {t['word'] * 1e3:.4f} ms  nz {t['nz'] * 1e3:.4f} ms  "
                    f"nz/word {t['nz'] / t['word']:.3f}  ({t['calls']} calls each)",
                    flush=True,
                )
            return
        os.environ["DSF_COLUMNS_MAX_DENSITY"] = "1"  # every factor gets its column indices
        g = torch.Generator().manual_seed(0)
        for density in densities:
            m = torch.randn(out_f, in_f, generator=g) * (torch.rand(out_f, in_f, generator=g) < density)
            packed = [fmt.pack(m, VALUE_DTYPES[args.values])]
            copies = _copies(packed, args.rotate_mib)
            preps = [
                backend.prepare("bitmap", {k: v.clone() for k, v in packed[0].items()}, (out_f, in_f), torch.float32)
                for _ in range(copies)
            ]
            actual = packed[0]["values"].numel() / (out_f * in_f)
            for batch in batches:
                x = torch.randn(batch, in_f)
                t = alternate(
                    COLUMN_PATHS,
                    lambda i: backend.matmul(preps[i % copies], x),
                    args.seconds,
                    lambda i: backend.refresh(preps[i % copies]),
                )
                print(
                    f"{args.shape} density {actual:.3f} batch {batch}: word {t['word'] * 1e3:.4f} ms  "
                    f"cols {t['cols'] * 1e3:.4f} ms  cols/word {t['cols'] / t['word']:.3f}  "
                    f"({t['calls']} calls each)",
                    flush=True,
                )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


if __name__ == "__main__":
    main()
