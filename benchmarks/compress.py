"""`dsf bench compress`: compression wall time in-process against Ray workers, the two
schedules' quality, and a simulation of large models on many GPUs from measured times.

Part one compresses one model three ways (in-process sequential, Ray sequential, Ray
parallel), keeps each checkpoint (reused when present, with the times of its
compression log), and evaluates held-out perplexity. Part two times DSF on random
matrices of a few sides at two iteration counts, fits time = a + b * m n (m + n) / 2 per
outer iteration, and schedules LLaMA-2-7B / 70B on 1, 8 and 64 workers (simulate).
"""

from __future__ import annotations

import heapq
import json
import time
from pathlib import Path
from typing import Sequence

from dsf_runtime.benchmarks.results_io import environment, markdown_table, write_results

# (rows, cols) of one decoder layer's seven linears, and the layer count
MODEL_SHAPES: dict[str, tuple[int, list[tuple[int, int]]]] = {
    "LLaMA-2-7B": (32, [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]),
    "LLaMA-2-70B": (
        80,
        [(8192, 8192), (1024, 8192), (1024, 8192), (8192, 8192)] + [(28672, 8192)] * 2 + [(8192, 28672)],
    ),
}
PAPER_70B_ONE_GPU_HOURS = 14.0  # the DSF paper's LLaMA-2-70B compression on one GPU


def cubic_size(rows: int, cols: int) -> float:
    """m n (m + n) / 2: n^3 for a square side n, the size DSF's time grows with."""
    return rows * cols * (rows + cols) / 2


def makespan(times: Sequence[float], workers: int) -> float:
    """Longest-processing-time-first schedule of independent tasks on ``workers``."""
    loads = [0.0] * max(1, workers)
    for t in sorted(times, reverse=True):
        heapq.heapreplace(loads, loads[0] + t)
    return max(loads)


def simulate(layer_times: Sequence[float], layers: int, workers: int, schedule: str, driver_per_layer: float = 0.0):
    """(seconds, critical path) of compressing ``layers`` layers whose matrices take
    ``layer_times`` each. sequential: a layer starts when the previous one is done
    (driver passes in between); parallel: every matrix is independent after one pass."""
    if schedule == "sequential":
        per_layer = makespan(layer_times, workers)
        return layers * (per_layer + driver_per_layer), f"{layers} layers x (largest matrix or the layer's share)"
    total = makespan(list(layer_times) * layers, workers)
    return total + layers * driver_per_layer, "the Gram pass, then max(all matrices / workers, the largest matrix)"


def fit_time_model(points: Sequence[tuple[int, int, float]]) -> tuple[float, float]:
    """Least squares of seconds = a + b * cubic_size(m, n) over (m, n, seconds) points."""
    xs = [cubic_size(m, n) for m, n, _ in points]
    ys = [t for _, _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else my / max(mx, 1e-30)
    return my - b * mx, b


def time_dsf(rows: int, cols: int, outer_iters: int, finalize_iters: int, seed: int = 0) -> float:
    """Seconds of one DSF factorization of a random rows x cols weight (paper settings
    apart from the iteration counts), Gram from random activations."""
    import torch

    from dsf_runtime.converters.config import preset
    from dsf_runtime.converters.factorize import dsf_factorize_info

    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(2 * cols, cols, generator=g)
    H = X.t() @ X / X.shape[0]
    config = preset("paper", outer_iters=outer_iters, finalize_iters=finalize_iters)
    start = time.perf_counter()
    dsf_factorize_info(W, H, config)
    return time.perf_counter() - start


def measure_iteration_costs(sides: Sequence[int], progress: bool = True) -> list[dict]:
    """Per side n (square n x n): seconds at (2, 1), (4, 1) and (2, 3) outer/finalize
    iterations, giving fixed cost, cost per outer iteration and per finalize iteration."""
    from tqdm.auto import tqdm

    rows = []
    for n in tqdm(sides, desc="timing DSF per side", disable=not progress):
        t21, t41, t23 = time_dsf(n, n, 2, 1), time_dsf(n, n, 4, 1), time_dsf(n, n, 2, 3)
        outer, finalize = max(0.0, (t41 - t21) / 2), max(0.0, (t23 - t21) / 2)
        fixed = max(0.0, t21 - 2 * outer - finalize)
        paper = fixed + 40 * outer + 20 * finalize
        rows.append({"side": n, "fixed_s": fixed, "outer_iter_s": outer, "finalize_iter_s": finalize, "paper_s": paper})
    return rows


def _variant_rows(
    model: str, preset_name: str, workers: int, work_dir: Path, eval_tokens: int, progress: bool, **calib
):
    from dsf_runtime.checkpoint import is_dsf_checkpoint, load_model
    from dsf_runtime.converters.pipeline import LOG_NAME, make_job, run_compress
    from dsf_runtime.data import evaluation_text, tokenize
    from dsf_runtime.evaluate import perplexity
    from dsf_runtime.models import load_dense

    variants = [
        ("in-process, sequential", "sequential", None),
        (f"Ray {workers} workers, sequential", "sequential", workers),
        (f"Ray {workers} workers, parallel", "parallel", workers),
    ]
    dense, tokenizer = load_dense(model)
    ids = tokenize(tokenizer, evaluation_text())
    n_eval = min(ids.numel(), eval_tokens or ids.numel())
    rows = [{"variant": "dense", "perplexity": perplexity(dense, ids, max_tokens=n_eval, progress=progress)}]
    del dense
    for label, schedule, n in variants:
        ckpt = work_dir / f"{preset_name}-{schedule}-{'ray' + str(n) if n else 'inprocess'}"
        if not is_dsf_checkpoint(ckpt):
            job = make_job(
                model, ckpt, preset_name=preset_name, schedule=schedule, workers=n, progress=progress, **calib
            )
            run_compress(job)
        log = json.loads((ckpt / LOG_NAME).read_text())
        reports = log["layers"]
        compute = sum(r["seconds"] for r in reports)
        overhead = sum(r.get("overhead", 0.0) for r in reports)
        sparse, _ = load_model(ckpt, backend="dense-ref", with_tokenizer=False)  # quality does not depend on the kernel
        rows.append(
            {
                "variant": label,
                "schedule": schedule,
                "executor": log.get("executor", "in-process"),
                "seconds": log["seconds"],
                "compute_s": compute,
                "matrices": len(reports),
                "workers_seen": len({r.get("worker") for r in reports}),
                "overhead_per_matrix_s": overhead / len(reports),
                "overhead_pct": 100 * overhead / max(compute, 1e-9),
                "perplexity": perplexity(sparse, ids, max_tokens=n_eval, progress=progress),
                "checkpoint": str(ckpt),
            }
        )
    base = rows[1]["seconds"]
    for row in rows[1:]:
        row["speedup"] = base / row["seconds"]
    return rows, n_eval


def run_compress_bench(
    model: str,
    *,
    preset_name: str = "paper",
    workers: int = 2,
    sides: Sequence[int] = (576, 1536, 4096),
    out_dir: str = "benchmarks/results",
    work_dir: str = "out/bench-compress",
    eval_tokens: int = 32768,
    progress: bool = True,
    **calib,
) -> dict:
    """Both parts; writes compress.json / compress.md under ``out_dir``. ``calib``:
    make_job's nsamples / seqlen / dsf_overrides (tests use small ones)."""
    rows, n_eval = _variant_rows(model, preset_name, workers, Path(work_dir), eval_tokens, progress, **calib)
    costs = measure_iteration_costs(sides, progress) if sides else []
    sims = []
    if costs:
        a, b = fit_time_model([(c["side"], c["side"], c["paper_s"]) for c in costs])
        # one GPU's speed relative to this CPU, from the paper's 70B figure on one GPU
        layers70, shapes70 = MODEL_SHAPES["LLaMA-2-70B"]
        cpu_70b = layers70 * sum(a + b * cubic_size(m, n) for m, n in shapes70)
        gpu_factor = cpu_70b / (PAPER_70B_ONE_GPU_HOURS * 3600)
        for name, (layers, shapes) in MODEL_SHAPES.items():
            times = [(a + b * cubic_size(m, n)) / gpu_factor for m, n in shapes]
            for schedule in ("sequential", "parallel"):
                for gpus in (1, 8, 64):
                    seconds, path = simulate(times, layers, gpus, schedule)
                    sims.append(
                        {"model": name, "schedule": schedule, "gpus": gpus, "hours": seconds / 3600, "critical": path}
                    )
        fit = {"a_s": a, "b_s_per_cubic": b, "gpu_speed_vs_this_cpu": gpu_factor}
    else:
        fit = {}
    env = environment()
    table = "\n\n".join(
        [
            f"{model}, preset {preset_name}, {workers} local Ray workers; CPU: {env['cpu']}, {env['cores']} cores; "
            f"perplexity on {n_eval} held-out tokens",
            markdown_table(
                rows,
                [
                    ("variant", "run", "s"),
                    ("seconds", "driver s", ".0f"),
                    ("speedup", "x in-process", ".2f"),
                    ("compute_s", "matrix compute s", ".0f"),
                    ("overhead_per_matrix_s", "Ray overhead s/matrix", ".3f"),
                    ("overhead_pct", "overhead % of compute", ".2f"),
                    ("perplexity", "perplexity", ".2f"),
                ],
            ),
            "DSF time per square side (paper iterations: fixed + 40 outer + 20 finalize)",
            markdown_table(
                costs,
                [
                    ("side", "side", "d"),
                    ("fixed_s", "fixed s", ".2f"),
                    ("outer_iter_s", "per outer iter s", ".3f"),
                    ("finalize_iter_s", "per finalize iter s", ".3f"),
                    ("paper_s", "paper preset s", ".1f"),
                ],
            ),
            "Simulated (GPU speed calibrated to the paper's 14 h for LLaMA-2-70B on one GPU)",
            markdown_table(
                sims,
                [
                    ("model", "model", "s"),
                    ("schedule", "schedule", "s"),
                    ("gpus", "GPUs", "d"),
                    ("hours", "hours", ".2f"),
                    ("critical", "critical path", "s"),
                ],
            ),
        ]
    )
    payload = {
        "environment": env,
        "model": model,
        "preset": preset_name,
        "workers": workers,
        "eval_tokens": n_eval,
        "runs": rows,
        "iteration_costs": costs,
        "fit": fit,
        "simulation": sims,
        "table": table,
    }
    files = write_results(Path(out_dir), "compress", payload, table)
    payload["files"] = {k: str(v) for k, v in files.items()}
    return payload
