"""Loading benchmark: disk to first token, and peak memory while loading, for a dense
model and a DSF checkpoint, each in a fresh Python process (same page-cache state:
every file is read once before timing)."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_mib(field: str = "VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) resident set size of this process in MiB.
    Read from /proc: getrusage's maxrss survives exec and would include the parent's."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(path: str, backend: str) -> dict:
    import torch

    from dsf_runtime.checkpoint import backend_summary, load_any

    before = _rss_mib()
    t0 = time.perf_counter()
    model, tok = load_any(path, backend=backend)
    t_load = time.perf_counter() - t0
    peak_load = _rss_mib()
    ids = tok("It is a truth universally acknowledged", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        model(ids)
    t_first = time.perf_counter() - t0
    final = _rss_mib("VmRSS")
    tensors = list(model.state_dict().values())
    seen, model_bytes = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            model_bytes += t.numel() * t.element_size()
    return {
        "path": path,
        "backend": backend_summary(model),
        "load_seconds": t_load,
        "first_token_seconds": t_first,
        "rss_before_mib": before,
        "peak_rss_after_load_mib": peak_load,
        "model_tensor_mib": model_bytes / 2**20,
        "load_peak_over_model": (peak_load - before) / (model_bytes / 2**20),
        "rss_after_first_token_mib": final,
        # peak while loading vs the memory the loaded model holds once it has run (every page touched)
        "load_peak_over_final": (peak_load - before) / max(final - before, 1e-9),
    }


def _run_child(path: str, backend: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "dsf_runtime.benchmarks.load", "--child", path, "--backend", backend],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"loading {path} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median_run(runs: list[dict]) -> dict:
    runs = sorted(runs, key=lambda r: r["first_token_seconds"])
    median = dict(runs[len(runs) // 2])
    median["runs"] = [r["first_token_seconds"] for r in runs]
    return median


def measure_alternating(paths: list[str], backend: str = "auto", repeats: int = 5) -> list[dict]:
    """Median of ``repeats`` fresh-process loads of each path, the paths taking turns
    (A B A B ...) so that a slow spell of the machine hits all of them alike; one
    warm-up load each first fills the page cache."""
    for path in paths:
        _run_child(path, backend)
    runs: list[list[dict]] = [[] for _ in paths]
    for _ in range(repeats):
        for i, path in enumerate(paths):
            runs[i].append(_run_child(path, backend))
    return [_median_run(r) for r in runs]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", required=True)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    print(json.dumps(_child(args.child, args.backend)))


if __name__ == "__main__":
    main()
