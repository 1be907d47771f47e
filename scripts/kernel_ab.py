"""A/B two versions of the CPU kernel source on one layer, in one process.

Kernel changes move the batch-1 time by a few percent, while this kind of machine
(shared vCPUs) drifts by tens of percent within a minute; timing version A, then B,
measures the drift. This compiles each source into its own library, loads both, and
calls them in alternation on the same factor pairs (rotated through more memory than
the last-level cache), so both see the same stretch of time. Each version is a
directory of kernel sources (as dsf_runtime/kernels/csrc), built as its own op library
under its own namespace (dsf_ab0, dsf_ab1), and runs the path --path names.

    python scripts/kernel_ab.py OLD_CSRC NEW_CSRC --shape 4096x4096 --batch 1 --kind fp16
    python scripts/kernel_ab.py OLD_CSRC NEW_CSRC --path word256 --kind bf16   # AVX-512's 256-bit variant
    mkdir old && git archive HEAD dsf_runtime/kernels/csrc | tar -x -C old  # an old version

Prints each version's median ms per y = L(R x) and NEW/OLD's ratio, over the whole run
and per quarter (so a ratio that flips between quarters shows as noise). Checks that
both versions give the same y first (--no-check skips that).

--new-kind times the new version on other stored values (the same factors, e.g. bf16
against fp16: `kernel_ab.py CSRC CSRC --kind fp16 --new-kind bf16`); the check then
allows for the rounding of the values.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from dsf_runtime.benchmarks.storage import random_dsf_pair
from dsf_runtime.formats import get_format
from dsf_runtime.kernels import cpu_ops

KINDS = {"fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
BIG = 1 << 30
# The op plan (csrc/ops.cpp) that runs each --path at any batch:
# [word path, nonzero path, nz_min_batch, columns_max_batch, dot path].
PLANS = {
    "word": [1, 1, BIG, 0, 0],
    "nz": [0, 1, 1, 0, 0],
    "cols": [1, 1, BIG, BIG, 0],
    "word512": [2, 2, BIG, 0, 0],
    "word256": [3, 2, BIG, 0, 0],
}


def load_ops(src: Path, namespace: str):
    """The op library built from the sources in ``src`` under ``namespace``, loaded."""
    try:
        cpu_ops.load(src, namespace)
    except cpu_ops.BuildError as exc:
        raise SystemExit(f"kernel_ab: {src}: {exc}") from None
    return cpu_ops.ops(namespace)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--shape", default="4096x4096", help="OUTxIN of the dense layer")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--sparsity", type=float, default=0.5, help="of the random DSF pair (default 0.5)")
    ap.add_argument("--kind", choices=sorted(KINDS), default="fp16")
    ap.add_argument(
        "--new-kind", choices=sorted(KINDS), help="stored values of the new version's factors (default: --kind)"
    )
    ap.add_argument(
        "--path",
        choices=["word", "nz", "cols", "word512", "word256"],
        default="word",
        help="AVX2 word path (the backend's below its nonzero-path batch), nonzero path (x as "
        "[in][batch]), column-index path (both factors, whatever their density), or the "
        "AVX-512 word path's 512-bit form or 256-bit variant (bf16 values)",
    )
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument(
        "--no-check", action="store_true", help="skip the equal-results check (to time a version with a phase cut out)"
    )
    ap.add_argument("--rotate-mib", type=int, default=1536)
    args = ap.parse_args(argv)
    try:
        out_f, in_f = (int(s) for s in args.shape.lower().split("x"))
    except ValueError:
        ap.error(f"--shape takes OUTxIN, e.g. 4096x4096, not {args.shape!r}")
    if args.batch < 1:
        ap.error("--batch must be at least 1")
    for src in (args.old, args.new):
        if not (src / "ops.cpp").is_file():
            ap.error(f"not a kernel source directory (no ops.cpp): {src}")
    kind_names = (args.kind, args.new_kind or args.kind)
    if args.path == "word256" and set(kind_names) != {"bf16"}:
        ap.error("--path word256 (the 256-bit variant) runs bf16 values only: --kind bf16")
    if args.path in ("word512", "word256") and "int8" in kind_names:
        ap.error("the AVX-512 word paths take fp16 or bf16 values, not int8")

    L, R = random_dsf_pair(out_f, in_f, args.sparsity)
    fmt = get_format("bitmap")
    packed = [[fmt.pack(L, KINDS[k]), fmt.pack(R, KINDS[k])] for k in kind_names]  # [version][L, R]
    libs = [load_ops(args.old, "dsf_ab0"), load_ops(args.new, "dsf_ab1")]
    empty = torch.empty(0)
    for pv in packed:
        for t, cols in zip(pv, (L.shape[1], R.shape[1])):
            # the ops' operands; the column-index path's 16-bit columns as the backend decodes them at load
            columns = (
                libs[0].bitmap_columns(t["bitmap"], t["row_offsets"], cols)
                if args.path == "cols"
                else torch.empty(0, dtype=torch.int16)
            )
            t["operands"] = [t["bitmap"], t["row_offsets"], t["values"], t.get("scales", empty), columns]
    nbytes = max(sum(t.numel() * t.element_size() for p in pv for t in p["operands"]) for pv in packed)
    copies = max(1, -(-args.rotate_mib * 2**20 // nbytes))
    # The versions read the same copies when their values are the same kind, else copies
    # allocated in turn: where the copies of one version were all allocated after the
    # other's, the second version timed 1.5% faster with both sources the same (where
    # each version's memory landed; the cause was not pinned down further).
    clones = [
        [[[t.clone() for t in p["operands"]] for p in pv] for pv in packed[: 1 + (kind_names[0] != kind_names[1])]]
        for _ in range(copies)
    ]  # [copy][version][L, R]
    pairs = [[c[min(v, len(c) - 1)] for c in clones] for v in range(2)]  # [version][copy][L, R]
    print(
        f"{args.shape} batch {args.batch} {'/'.join(dict.fromkeys(kind_names))}: {nbytes / 2**20:.1f} MiB per "
        f"call, {copies} copies; L {tuple(L.shape)} density {packed[0][0]['values'].numel() / L.numel():.2f}, "
        f"R {tuple(R.shape)} density {packed[0][1]['values'].numel() / R.numel():.2f}"
    )

    x = torch.randn(args.batch, in_f)

    plan = PLANS[args.path]

    def call(v: int, i: int) -> torch.Tensor:
        tl, tr = pairs[v][i]
        return libs[v].bitmap_pair(x, tr, in_f, plan, tl, R.shape[0], plan)

    ya, yb = call(0, 0), call(1, 0)
    if not args.no_check:
        if kind_names[0] == kind_names[1]:
            torch.testing.assert_close(yb, ya, rtol=1e-4, atol=1e-4)
        else:  # the same factors in other values: equal up to their rounding (int8: ~1%)
            err = float((yb - ya).norm() / ya.norm())
            if not err < 0.05:
                raise SystemExit(
                    f"kernel_ab: the versions' y differ by {err:.3g} (relative), more than "
                    "the rounding of {} vs {} values".format(*kind_names)
                )
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
    print(
        f"per mask byte (both factors, all threads): old {med[0] * 1e6 / mask_bytes:.3f} ns, "
        f"new {med[1] * 1e6 / mask_bytes:.3f} ns"
    )
    print(
        f"old {med[0]:.3f} ms  new {med[1]:.3f} ms  new/old {med[1] / med[0]:.3f}  "
        f"quarters {' '.join(f'{r:.3f}' for r in per_q)}  ({n} calls each)"
    )


if __name__ == "__main__":
    main()
