"""A/B two checkouts of dsf-runtime on one DSF layer, interleaved in time.

kernel_ab.py compares two kernel source directories inside one process; this compares
two whole checkouts (Python dispatch, op or ctypes binding, kernel), which cannot share
a process: each runs in a worker process of its own with PYTHONPATH at its checkout,
and the parent asks the two for short bursts of calls in turn (ABBA order), so that the
drift of a shared machine lands on both alike. Each worker builds the same random DSF
pair (same seed), packs it as bitmap with bf16 values, prepares enough copies to rotate
past the last-level cache and times y = L(R x) through ``backend.matmul`` (the API both
old and new checkouts have).

    python scripts/checkout_ab.py OLD_CHECKOUT NEW_CHECKOUT --shape 4096x4096 --batch 1,4,16

A checkout is a directory holding dsf_runtime/ (an older one also needs its converters/,
serve/ and benchmarks/ linked inside dsf_runtime/ when it predates those folders being
installed as subpackages; --link does that in place). Prints per batch each checkout's
median ms per call and NEW/OLD, over the run and per quarter.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import json, statistics, sys, time
import torch
from dsf_runtime.benchmarks.storage import random_dsf_pair
from dsf_runtime.formats import get_format
from dsf_runtime.kernels import BACKENDS

out_f, in_f, rotate = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
L, R = random_dsf_pair(out_f, in_f, 0.5)
backend = BACKENDS["cpu-bitmap"]
fmt = get_format("bitmap")
tl, tr = fmt.pack(L, torch.bfloat16), fmt.pack(R, torch.bfloat16)
nbytes = sum(t.numel() * t.element_size() for t in (*tl.values(), *tr.values()))
copies = max(2, -(-rotate // nbytes))
preps = [tuple(backend.prepare("bitmap", {k: v.clone() for k, v in t.items()}, tuple(m.shape), torch.float32)
               for t, m in ((tl, L), (tr, R))) for _ in range(copies)]
print(json.dumps({"isa": getattr(backend, "isa", "?"), "copies": copies}), flush=True)
i = 0
for line in sys.stdin:
    batch, calls = map(int, line.split())
    x = torch.randn(batch, in_f)
    times = []
    for _ in range(calls):
        pl, pr = preps[i % copies]
        i += 1
        t0 = time.perf_counter()
        backend.matmul(pl, backend.matmul(pr, x))
        times.append(time.perf_counter() - t0)
    print(json.dumps(statistics.median(times)), flush=True)
"""


def start(checkout: Path, shape: tuple[int, int], rotate: int) -> tuple[subprocess.Popen, dict]:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(shape[0]), str(shape[1]), str(rotate)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=checkout,
    )
    info = json.loads(proc.stdout.readline())
    return proc, info


def burst(proc: subprocess.Popen, batch: int, calls: int) -> float:
    proc.stdin.write(f"{batch} {calls}\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--shape", default="4096x4096", help="OUTxIN of the dense layer")
    ap.add_argument("--batch", default="1,4,16", help="comma-separated batch sizes")
    ap.add_argument("--rounds", type=int, default=24, help="bursts per checkout and batch")
    ap.add_argument("--calls", type=int, default=10, help="calls per burst")
    ap.add_argument("--rotate-mib", type=int, default=1536, help="weights rotated through per checkout")
    ap.add_argument("--link", action="store_true", help="link converters/, serve/, benchmarks/ into dsf_runtime/")
    args = ap.parse_args(argv)
    try:
        shape = tuple(int(v) for v in args.shape.lower().split("x"))
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        ap.error("--shape takes OUTxIN and --batch comma-separated integers")
    for checkout in (args.old, args.new):
        if not (checkout / "dsf_runtime").is_dir():
            ap.error(f"{checkout} holds no dsf_runtime/ directory")
        if args.link:
            for sub in ("converters", "serve", "benchmarks"):
                link = checkout / "dsf_runtime" / sub
                if (checkout / sub).is_dir() and not link.exists():
                    link.symlink_to(Path("..") / sub)
    workers = [start(c, shape, args.rotate_mib << 20) for c in (args.old, args.new)]
    print(
        f"shape {shape[0]}x{shape[1]}; old isa {workers[0][1]['isa']}, new isa {workers[1][1]['isa']}; "
        f"{workers[0][1]['copies']} copies rotated"
    )
    for batch in batches:
        times: list[list[float]] = [[], []]
        for r in range(args.rounds):
            order = (0, 1) if r % 2 == 0 else (1, 0)
            for w in order:
                times[w].append(burst(workers[w][0], batch, args.calls))
        old, new = (statistics.median(t) * 1e3 for t in times)
        q = args.rounds // 4
        quarters = (
            [
                statistics.median(times[1][k * q : (k + 1) * q]) / statistics.median(times[0][k * q : (k + 1) * q])
                for k in range(4)
            ]
            if q
            else []
        )
        print(
            f"batch {batch}: old {old:.3f} ms, new {new:.3f} ms, new/old {new / old:.3f} "
            f"(quarters {' '.join(f'{v:.2f}' for v in quarters)})"
        )
    for proc, _ in workers:
        proc.stdin.close()
        proc.wait()


if __name__ == "__main__":
    main()
