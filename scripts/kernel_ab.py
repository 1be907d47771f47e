"""A/B two versions of the CPU kernel source on one layer, in one process.

Kernel changes move the batch-1 time by a few percent, while this kind of machine
(shared vCPUs) drifts by tens of percent within a minute; timing version A, then B,
measures the drift. This compiles each source into its own library, loads both, and
calls them in alternation on the same factor pairs (rotated through more memory than
the last-level cache), so both see the same stretch of time.

    python scripts/kernel_ab.py OLD.cpp NEW.cpp --shape 4096x4096 --batch 1 --kind fp16
    python scripts/kernel_ab.py OLD.cpp NEW.cpp --path word256 --kind bf16   # AVX-512's 256-bit variant
    git show HEAD:dsf_runtime/kernels/csrc/bitmap_spmm.cpp > /tmp/old.cpp  # an old version

Prints each version's median ms per y = L(R x) and NEW/OLD's ratio, over the whole run
and per quarter (so a ratio that flips between quarters shows as noise). Checks that
both versions give the same y first (--no-check skips that).

--new-kind times the new version on other stored values (the same factors, e.g. bf16
against fp16: `kernel_ab.py K.cpp K.cpp --kind fp16 --new-kind bf16`); the check then
allows for the rounding of the values.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from pathlib import Path

import torch

from dsf_runtime.benchmarks.storage import random_dsf_pair
from dsf_runtime.formats import get_format
from dsf_runtime.kernels.cpu_bitmap import KIND_CODES, bind, compile_library, find_compiler

KINDS = {"fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}


def compile_lib(src: Path) -> ctypes.CDLL:
    """The backend's build (cached per source text and compiler) of ``src``, loaded."""
    cxx = find_compiler()
    if cxx is None:
        raise SystemExit("kernel_ab: no C++ compiler found (set CXX or install g++)")
    try:
        return bind(ctypes.CDLL(str(compile_library(src, cxx))))
    except RuntimeError as exc:
        raise SystemExit(f"kernel_ab: compiling {src} failed: {exc}") from None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--shape", default="4096x4096", help="OUTxIN of the dense layer")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--sparsity", type=float, default=0.5, help="of the random DSF pair (default 0.5)")
    ap.add_argument("--kind", choices=sorted(KINDS), default="fp16")
    ap.add_argument("--new-kind", choices=sorted(KINDS),
                    help="stored values of the new version's factors (default: --kind)")
    ap.add_argument("--path", choices=["word", "nz", "cols", "word512", "word256"], default="word",
                    help="AVX2 word path (the backend's below its nonzero-path batch), nonzero path (x as "
                         "[in][batch]), column-index path (both factors, whatever their density), or the "
                         "AVX-512 word path's 512-bit form or 256-bit variant (bf16 values)")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--no-check", action="store_true",
                    help="skip the equal-results check (to time a version with a phase cut out)")
    ap.add_argument("--rotate-mib", type=int, default=1536)
    args = ap.parse_args(argv)
    try:
        out_f, in_f = (int(s) for s in args.shape.lower().split("x"))
    except ValueError:
        ap.error(f"--shape takes OUTxIN, e.g. 4096x4096, not {args.shape!r}")
    if args.batch < 1:
        ap.error("--batch must be at least 1")
    for src in (args.old, args.new):
        if not src.is_file():
            ap.error(f"no such source file: {src}")
    kind_names = (args.kind, args.new_kind or args.kind)
    if args.path == "word256" and set(kind_names) != {"bf16"}:
        ap.error("--path word256 (the 256-bit variant) runs bf16 values only: --kind bf16")
    if args.path in ("word512", "word256") and "int8" in kind_names:
        ap.error("the AVX-512 word paths take fp16 or bf16 values, not int8")

    L, R = random_dsf_pair(out_f, in_f, args.sparsity)
    fmt = get_format("bitmap")
    packed = [[fmt.pack(L, KINDS[k]), fmt.pack(R, KINDS[k])] for k in kind_names]  # [version][L, R]
    libs = [compile_lib(args.old), compile_lib(args.new)]
    if args.path == "cols":  # each factor's 16-bit column indices, as the backend decodes them at load
        index_lib = libs[0]
        for pv in packed:
            for t, (rows, cols) in zip(pv, (L.shape, R.shape)):
                t["columns"] = torch.empty(t["values"].numel(), dtype=torch.int16)
                rc = index_lib.dsf_bitmap_columns(t["bitmap"].data_ptr(), t["row_offsets"].data_ptr(), rows,
                                                  t["bitmap"].shape[1], cols, t["values"].numel(),
                                                  t["columns"].data_ptr())
                assert rc == 0, "dsf_bitmap_columns refused the factor"
    nbytes = max(sum(t.numel() * t.element_size() for p in pv for t in p.values()) for pv in packed)
    copies = max(1, -(-args.rotate_mib * 2**20 // nbytes))
    # The versions read the same copies when their values are the same kind, else copies
    # allocated in turn: where the copies of one version were all allocated after the
    # other's, the second version timed 1.5% faster with both sources the same (where
    # each version's memory landed; the cause was not pinned down further).
    clones = [[[{k: v.clone() for k, v in p.items()} for p in pv] for pv in packed[: 1 + (kind_names[0] != kind_names[1])]]
              for _ in range(copies)]  # [copy][version][L, R]
    pairs = [[c[min(v, len(c) - 1)] for c in clones] for v in range(2)]  # [version][copy][L, R]
    print(f"{args.shape} batch {args.batch} {'/'.join(dict.fromkeys(kind_names))}: {nbytes / 2**20:.1f} MiB per "
          f"call, {copies} copies; L {tuple(L.shape)} density {packed[0][0]['values'].numel() / L.numel():.2f}, "
          f"R {tuple(R.shape)} density {packed[0][1]['values'].numel() / R.numel():.2f}")

    x = torch.randn(args.batch, in_f)

    def factor(lib: ctypes.CDLL, kind: int, t: dict[str, torch.Tensor], rows: int, xin: torch.Tensor) -> torch.Tensor:
        words = t["bitmap"].shape[1]
        scales = t["scales"].data_ptr() if "scales" in t else None
        if args.path == "cols":
            y = torch.empty(xin.shape[0], rows)
            rc = lib.dsf_bitmap_spmm_cols_avx2(t["row_offsets"].data_ptr(), t["columns"].data_ptr(),
                                               t["values"].data_ptr(), scales, xin.data_ptr(), xin.shape[1],
                                               y.data_ptr(), rows, rows, xin.shape[1], xin.shape[0], kind)
            assert rc == 0, "kernel refused its arguments"
            return y
        if args.path == "nz":
            y = torch.empty(xin.shape[0], rows)
            rc = lib.dsf_bitmap_spmm_nz_avx2(t["bitmap"].data_ptr(), t["row_offsets"].data_ptr(),
                                             t["values"].data_ptr(), scales, xin.data_ptr(), xin.shape[1],
                                             y.data_ptr(), rows, rows, xin.shape[1], words, xin.shape[0], kind)
            assert rc == 0, "kernel refused its arguments"
            return y
        xp = torch.zeros(xin.shape[0], words * 32)
        xp[:, : xin.shape[1]] = xin
        y = torch.empty(xin.shape[0], rows)
        if args.path in ("word512", "word256"):  # mode: bit 0 bf16 values, bit 1 the 256-bit variant
            mode = kind | (2 if args.path == "word256" else 0)
            rc = lib.dsf_bitmap_spmm_avx512(t["bitmap"].data_ptr(), t["row_offsets"].data_ptr(),
                                            t["values"].data_ptr(), t["values"].numel(), xp.data_ptr(), words * 32,
                                            y.data_ptr(), rows, rows, words, xin.shape[0], mode)
            assert rc == 0, "kernel refused its arguments (no AVX-512 VBMI2, or AVX512_BF16 for word256)"
            return y
        rc = lib.dsf_bitmap_spmm_avx2(t["bitmap"].data_ptr(), t["row_offsets"].data_ptr(), t["values"].data_ptr(),
                                      scales, t["values"].numel(), xp.data_ptr(), words * 32, y.data_ptr(), rows,
                                      rows, words, xin.shape[0], kind)
        assert rc == 0, "kernel refused its arguments"
        return y

    def call(v: int, i: int) -> torch.Tensor:
        tl, tr = pairs[v][i]
        kind = KIND_CODES[KINDS[kind_names[v]]]
        return factor(libs[v], kind, tl, out_f, factor(libs[v], kind, tr, R.shape[0], x))

    ya, yb = call(0, 0), call(1, 0)
    if not args.no_check:
        if kind_names[0] == kind_names[1]:
            torch.testing.assert_close(yb, ya, rtol=1e-4, atol=1e-4)
        else:  # the same factors in other values: equal up to their rounding (int8: ~1%)
            err = float((yb - ya).norm() / ya.norm())
            if not err < 0.05:
                raise SystemExit(f"kernel_ab: the versions' y differ by {err:.3g} (relative), more than "
                                 "the rounding of {} vs {} values".format(*kind_names))
    times: list[list[float]] = [[], []]
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        for v in (0, 1) if calls % 16 == 0 else (1, 0):
            for j in range(4):  # bursts of 4, the first untimed; never a copy the other just read
                t0 = time.perf_counter()
                call(v, calls % copies)
                calls += 1
                if j:
                    times[v].append(time.perf_counter() - t0)
    n = len(times[0])
    quarters = [slice(q * n // 4, (q + 1) * n // 4) for q in range(4)]
    med = [statistics.median(t) * 1e3 for t in times]
    per_q = [statistics.median(times[1][s]) / statistics.median(times[0][s]) for s in quarters]
    mask_bytes = (L.numel() + R.numel()) / 8
    print(f"per mask byte (both factors, all threads): old {med[0] * 1e6 / mask_bytes:.3f} ns, "
          f"new {med[1] * 1e6 / mask_bytes:.3f} ns")
    print(f"old {med[0]:.3f} ms  new {med[1]:.3f} ms  new/old {med[1] / med[0]:.3f}  "
          f"quarters {' '.join(f'{r:.3f}' for r in per_q)}  ({n} calls each)")


if __name__ == "__main__":
    main()
