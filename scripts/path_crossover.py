"""Where the cpu-bitmap backend should switch from its word path to its nonzero path.

Times one DSF layer (random factors at DSF's densities, fp16 values, rotated through
more memory than the last-level cache) through the backend with the nonzero path forced
off and forced on, alternating call by call in one process so that both see the same
stretch of a shared host's time, for each batch size given:

    python scripts/path_crossover.py 4096x11008 8,10,12,16 --seconds 8

Prints each path's median ms per y = L(R x) and nz/word; NZ_MIN_BATCH in
dsf_runtime/kernels/cpu_bitmap.py is set from where that ratio crosses 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from dsf_runtime.benchmarks.storage import random_dsf_pair
from dsf_runtime.formats import get_format
from dsf_runtime.kernels import BACKENDS

PATHS = {"word": "1000000000", "nz": "1"}  # DSF_NZ_MIN_BATCH forcing each path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", help="OUTxIN of the dense layer")
    ap.add_argument("batches", help="comma-separated batch sizes")
    ap.add_argument("--seconds", type=float, default=8.0, help="per batch size")
    ap.add_argument("--rotate-mib", type=int, default=512)
    args = ap.parse_args(argv)
    try:
        out_f, in_f = (int(s) for s in args.shape.lower().split("x"))
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        ap.error("shape is OUTxIN (e.g. 4096x4096) and batches comma-separated integers")
    if min(batches) < 1 or out_f < 1 or in_f < 1:
        ap.error("sizes and batches must be positive")
    backend = BACKENDS["cpu-bitmap"]
    if not backend.available() or backend.isa == "portable":
        raise SystemExit("path_crossover: the cpu-bitmap kernel has no vector path on this machine")

    L, R = random_dsf_pair(out_f, in_f, 0.5)
    fmt = get_format("bitmap")
    packed = [fmt.pack(m, torch.float16) for m in (L, R)]
    nbytes = sum(t.numel() * t.element_size() for p in packed for t in p.values())
    copies = max(1, -(-args.rotate_mib * 2**20 // nbytes))
    preps = [[backend.prepare("bitmap", {k: v.clone() for k, v in p.items()}, tuple(m.shape), torch.float32)
              for p, m in zip(packed, (L, R))] for _ in range(copies)]
    print(f"{args.shape}: {nbytes / 2**20:.1f} MiB per call, {copies} copies, ISA {backend.isa}")
    saved = os.environ.get("DSF_NZ_MIN_BATCH")
    try:
        for batch in batches:
            x = torch.randn(batch, in_f)
            times: dict[str, list[float]] = {p: [] for p in PATHS}
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < args.seconds:
                for path in ("word", "nz") if calls % 2 else ("nz", "word"):
                    os.environ["DSF_NZ_MIN_BATCH"] = PATHS[path]
                    pl, pr = preps[calls % copies]
                    t0 = time.perf_counter()
                    backend.matmul(pl, backend.matmul(pr, x))
                    times[path].append(time.perf_counter() - t0)
                calls += 1
            word, nz = (statistics.median(times[p]) * 1e3 for p in ("word", "nz"))
            print(f"{args.shape} batch {batch}: word {word:.4f} ms  nz {nz:.4f} ms  nz/word {nz / word:.3f}  "
                  f"({calls} calls each)", flush=True)
    finally:
        if saved is None:
            os.environ.pop("DSF_NZ_MIN_BATCH", None)
        else:
            os.environ["DSF_NZ_MIN_BATCH"] = saved


if __name__ == "__main__":
    main()
