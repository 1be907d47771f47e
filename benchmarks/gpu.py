"""GPU benchmark (CUDA): one DSF layer and a decode stack on the GPU, and the converter.

- layer: y = W x for LLaMA-7B and SmolLM2 shapes at batch 1/4/16: dense fp16 and bf16
  (cuBLAS) vs DSF 50% on cuSPARSE CSR (``torch-csr``, and ``cupy-csr`` with a measured
  call per shape), on the Triton bitmap kernel (fp16 values fetched per column or as
  runs, and int8) and on the CUDA C++ bitmap kernel (``cupy-bitmap``). Timed with ``triton.testing.do_bench`` (CUDA events, the
  median; it flushes the L2 cache before every call, so weights come from HBM), next
  to the device's copy bandwidth measured in the same run.
- decode: pp/tg tokens/s of batch-1 greedy decoding through the serving runner, with and
  without CUDA graphs, on SmolLM2-135M and LLaMA-7B-shaped stacks with random factors:
  dense fp16 and bf16 vs DSF on each CUDA backend.
- convert: seconds per decoder layer of the DSF converter (``paper`` preset) on the GPU,
  on a SmolLM2-135M-shaped model with random weights and random calibration tokens
  (the algorithm's work does not depend on the values; the real model's quality is
  measured by ``dsf bench quality``).

``dry_run`` runs every part on the CPU, with Triton's interpreter (TRITON_INTERPRET=1)
and tiny shapes: its numbers mean nothing, but it proves on a machine without a GPU that
a lent GPU's few minutes will not be lost to a broken script (scripts/gpu_check.sh
DRY_RUN=1 runs it, and tests/test_gpu_check.py runs that).
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import torch

from dsf_runtime.benchmarks.layer import SHAPES
from dsf_runtime.benchmarks.storage import random_dsf_pair
from dsf_runtime.errors import ConfigError
from dsf_runtime.formats import get_format
from dsf_runtime.kernels import BACKENDS, can_run


def _error_text(exc: Exception) -> str:
    """One line for a results table: the exception's type and the start of its message."""
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0][:120] if lines else ''}"


DRY_SHAPES = {"dry-run 96x160": (96, 160)}


def _free_cuda() -> None:
    """Drop the last case's tensors before the next one allocates."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _prepare_pair(backend, L: torch.Tensor, R: torch.Tensor, value_dtype: torch.dtype, device: str = "cuda"):
    """Both factors packed as bitmap, moved to ``device`` and prepared for ``backend``."""
    bitmap = get_format("bitmap")
    return tuple(
        backend.prepare(
            "bitmap",
            {k: v.to(device) for k, v in bitmap.pack(M, value_dtype).items()},
            tuple(M.shape),
            torch.float16,
        )
        for M in (L, R)
    )


def _require_device(dry_run: bool) -> str:
    """The device the parts run on: cuda, or the CPU in Triton's interpreter for a dry run."""
    from dsf_runtime.kernels.triton_bitmap import interpreting, triton_installed

    if not triton_installed():
        raise ConfigError("dsf bench gpu needs Triton (pip install triton)")
    if dry_run:
        if not interpreting():
            raise ConfigError(
                "dsf bench gpu --dry-run runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1"
            )
        return "cpu"
    if not torch.cuda.is_available():
        raise ConfigError("dsf bench gpu needs a CUDA GPU (torch.cuda.is_available() is False)")
    return "cuda"


def _median_us(fn, device: str = "cuda") -> float:
    if device != "cuda":  # a dry run: one call (its time means nothing)
        t0 = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - t0)
    from triton.testing import do_bench

    return 1e3 * do_bench(fn, warmup=25, rep=100, return_mode="median")


def _graph_us(fn, x: torch.Tensor) -> float:
    """Median microseconds of ``fn(x)`` replayed from a CUDA graph: the GPU's time
    without Python and launch overhead (what a graph-captured decode step pays).
    On the CPU (a dry run) the eager time."""
    if x.device.type != "cuda":
        return _median_us(lambda: fn(x), x.device.type)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(x)
    return _median_us(graph.replay)


def device_bandwidth(nbytes: int = 1 << 30, device: str = "cuda") -> float:
    """GB/s of a device-to-device copy, bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    us = _median_us(lambda: dst.copy_(src), device)
    return 2 * nbytes / (us * 1e-6) / 1e9


def _prepared_bytes(obj) -> int:
    tensors = [v for v in vars(obj).values() if isinstance(v, torch.Tensor)]
    if isinstance(getattr(obj, "matrix", None), torch.Tensor):  # torch sparse CSR (cupy-csr keeps its tensors beside)
        m = obj.matrix
        tensors = [m.crow_indices(), m.col_indices(), m.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


def layer_cases(out_f: int, in_f: int, sparsity: float, device: str = "cuda"):
    """(name, fn(x) -> y, bytes of weights one call reads) per implementation, and the
    dense fp32 product L @ R of the DSF factors (the reference the DSF cases must match)."""
    W = (torch.randn(out_f, in_f) * 0.02).to(device)
    cases = []
    for name, dt in (("dense fp16", torch.float16), ("dense bf16", torch.bfloat16)):
        w = W.to(dt)
        cases.append((name, lambda x, w=w: torch.nn.functional.linear(x.to(w.dtype), w), w.numel() * w.element_size()))
    del W
    L, R = random_dsf_pair(out_f, in_f, sparsity)
    impls = [
        ("DSF triton-bitmap fp16", "triton-bitmap", torch.float16),
        ("DSF triton-bitmap int8", "triton-bitmap", torch.int8),
        ("DSF torch-csr (cuSPARSE) fp16", "torch-csr", torch.float16),
    ]
    if device == "cuda":  # cupy's backends run CUDA tensors only (a row says why where cupy is missing)
        impls += [
            ("DSF cupy-bitmap fp16", "cupy-bitmap", torch.float16),
            ("DSF cupy-csr (cuSPARSE) fp16", "cupy-csr", torch.float16),
        ]
    for name, backend_name, value_dtype in impls:
        backend = BACKENDS[backend_name]
        try:
            ok, why = can_run(backend, "bitmap", device) if device == "cuda" else (True, "")  # dry run: interpreter
            if not ok:
                raise RuntimeError(f"{backend_name}: {why}")
            pl, pr = _prepare_pair(backend, L, R, value_dtype, device)
        except Exception as exc:  # reported in the table, the other cases still run
            cases.append((name, exc, 0))
            continue
        nbytes = _prepared_bytes(pl) + _prepared_bytes(pr)
        if name == "DSF triton-bitmap fp16":  # the kernel's two ways to fetch values, raced
            from dsf_runtime.kernels.triton_bitmap import launch

            for fetch, segment in (("column", False), ("run", True)):
                fn = lambda x, pl=pl, pr=pr, s=segment: launch(pl, launch(pr, x, segment=s), segment=s)  # noqa: E731
                cases.append((f"{name} {fetch} fetch", fn, nbytes))
            continue
        cases.append((name, lambda x, b=backend, pl=pl, pr=pr: b.matmul(pl, b.matmul(pr, x)), nbytes))
    product = L.half().float().to(device) @ R.half().float().to(device)  # the fp16-stored factors' product
    return cases, product


def run_layer(
    shapes: dict[str, tuple[int, int]],
    batches: tuple[int, ...],
    sparsity: float,
    bandwidth: float,
    progress: bool = True,
    device: str = "cuda",
) -> list[dict]:
    rows: list[dict] = []
    try:
        _layer_rows(rows, shapes, batches, sparsity, bandwidth, progress, device)
    except KeyboardInterrupt:  # the step's time limit (SIGINT): keep the rows timed so far
        print(f"layer part interrupted after {len(rows)} rows; writing those", flush=True)
    return rows


def _layer_rows(
    rows: list, shapes: dict, batches: tuple, sparsity: float, bandwidth: float, progress: bool, device: str
) -> None:
    no_graph: set[str] = set()
    with torch.inference_mode():
        for label, (out_f, in_f) in shapes.items():
            cases, product = layer_cases(out_f, in_f, sparsity, device)
            for batch in batches:
                x = torch.randn(batch, in_f, device=device, dtype=torch.float16)
                ref = x.float() @ product.t()
                group = []
                for name, fn, nbytes in cases:
                    row = {"shape": label, "batch": batch, "impl": name}
                    group.append(row)
                    try:
                        if isinstance(fn, Exception):
                            raise fn
                        y = fn(x).float()
                        if name.startswith("DSF"):  # int8 adds its rounding (<= half a step per value)
                            row["rel_err"] = float((y - ref).norm() / ref.norm())
                        row["us_eager"] = _median_us(lambda fn=fn: fn(x), device)
                        row["weight_mib"] = nbytes / 2**20
                        if device != "cuda":
                            row["us"], row["note"] = row["us_eager"], "dry run: eager on the CPU"
                        elif name in no_graph:
                            row["us"], row["note"] = row["us_eager"], "eager (graph capture failed)"
                        else:
                            try:
                                row["us"] = _graph_us(fn, x)
                            except Exception as exc:  # e.g. a library that cannot be captured
                                no_graph.add(name)
                                row["us"], row["note"] = (
                                    row["us_eager"],
                                    f"eager (graph capture failed: {type(exc).__name__})",
                                )
                    except Exception as exc:
                        row["error"] = _error_text(exc)
                        print(f"{label} batch {batch} {name}: {row['error']}", flush=True)
                        continue
                    gbs = (nbytes + x.numel() * 2) / (row["us"] * 1e-6) / 1e9
                    row.update({"gb_s": gbs, "pct_bw": 100 * gbs / bandwidth})
                for r in group:  # ratios of graph-replay times (kernel time, no launch overhead)
                    if "us" in r and "us" in group[0] and "us" in group[1]:
                        r["speedup_vs_fp16"] = group[0]["us"] / r["us"]
                        r["speedup_vs_bf16"] = group[1]["us"] / r["us"]
                rows.extend(group)
                if progress:
                    print(
                        f"{label} batch {batch}: "
                        + ", ".join(f"{r['impl']} {r.get('us', float('nan')):.1f} us" for r in group),
                        flush=True,
                    )
            del cases, product
            _free_cuda()


def run_tune(
    out_f: int = 4096, in_f: int = 4096, sparsity: float = 0.5, device: str = "cuda", dry_run: bool = False
) -> list[dict]:
    """Graph-replay time of one DSF layer (L and R) on the Triton kernel per launch setting:
    block rows x words per step x warps x programs per SM (how far split-K goes), for the
    vector path (batch 1) and the dot path (batch 16); then both paths at batches 2-8, which
    sets DOT_MIN_BATCH. A dry run launches the first setting of each list only."""
    pairs = random_dsf_pair(out_f, in_f, sparsity)
    pl, pr = _prepare_pair(BACKENDS["triton-bitmap"], *pairs, torch.float16, device)
    rows = []
    # (block rows, words per step, warps, programs per SM, run fetch): the tuned settings first,
    # then how far split-K goes, then the run fetch (tuning.json's how_measured has the
    # block-rows x words grid of the per-column fetch)
    plans = {
        1: [(64, 2, 4, 4, False), (32, 2, 4, 4, False)]
        + [(b, w, 4, p, False) for b, w in ((16, 8), (32, 4), (64, 2)) for p in (1, 2, 8)]
        + [(b, w, n, p, True) for b, w in ((16, 8), (32, 4), (64, 2), (32, 8)) for n in (4, 8) for p in (1, 4)],
        16: [(64, 2, 4, 4, False), (64, 1, 4, 4, False)]
        + [(b, w, 4, p, False) for b, w in ((32, 2), (64, 2)) for p in (1, 2, 8)]
        + [(b, w, 4, p, True) for b, w in ((32, 2), (64, 2), (64, 4)) for p in (1, 4)],
    }
    crossover = (2, 3, 4, 6, 8)
    if dry_run:
        plans, crossover = {batch: configs[:1] for batch, configs in plans.items()}, crossover[:1]
    try:
        _tune_rows(rows, pl, pr, plans, crossover, in_f, f"{out_f}x{in_f}", device)
    except KeyboardInterrupt:  # the step's time limit (SIGINT): keep the rows timed so far
        print(f"tuning interrupted after {len(rows)} settings; writing those", flush=True)
    return rows


def _tune_rows(rows: list, pl, pr, plans: dict, crossover: tuple, in_f: int, shape: str, device: str) -> None:
    from dsf_runtime.kernels.triton_bitmap import DOT_MIN_BATCH

    with torch.inference_mode():
        for batch, configs in plans.items():
            x = torch.randn(batch, in_f, device=device, dtype=torch.float16)
            for block_r, wpi, warps, pps, segment in configs:
                kw = dict(
                    block_r=block_r,
                    wpi=wpi,
                    num_warps=warps,
                    programs_per_sm=pps,
                    segment=segment,
                    use_dot=batch >= DOT_MIN_BATCH,
                )
                rows.append(_tune_row(pl, pr, x, kw, shape))
        # where the tl.dot path (tiles padded to 16 batch rows) overtakes the vector path
        for batch in crossover:
            x = torch.randn(batch, in_f, device=device, dtype=torch.float16)
            for path_dot in (False, True):
                rows.append(_tune_row(pl, pr, x, dict(use_dot=path_dot), shape))


def suggested_entry(rows: list[dict]) -> dict:
    """A kernels/tuning.json GPU entry from a tuning run: each path's fastest setting (the
    vector path's at batch 1, the dot path's at batch 16) and the first crossover batch
    from which the dot path is faster at default settings (what a maintainer reviews and
    commits under the GPU's name)."""
    entry: dict = {}
    settings = ("block_r", "wpi", "num_warps", "programs_per_sm", "segment")
    for path, batch in (("vector", 1), ("dot", 16)):
        timed = [r for r in rows if r["path"] == path and r["batch"] == batch and "us" in r]
        if timed:
            best = min(timed, key=lambda r: r["us"])
            entry[path] = {k: best[k] for k in settings}
    by_batch: dict[int, dict[str, float]] = {}
    for r in rows:
        if "us" in r and r["batch"] not in (1, 16):
            by_batch.setdefault(r["batch"], {})[r["path"]] = r["us"]
    faster = [b for b, t in sorted(by_batch.items()) if {"vector", "dot"} <= set(t) and t["dot"] < t["vector"]]
    if by_batch:
        entry["dot_min_batch"] = faster[0] if faster else max(by_batch) + 1
    return entry


def _tune_row(pl, pr, x: torch.Tensor, kw: dict, shape: str) -> dict:
    from dsf_runtime.kernels.triton_bitmap import launch, resolve_config

    config = resolve_config(x.shape[0], **kw)
    row = {
        "shape": shape,
        "batch": x.shape[0],
        "path": "dot" if config["use_dot"] else "vector",
        "block_r": config["block_r"],
        "wpi": config["wpi"],
        "num_warps": config["num_warps"],
        "programs_per_sm": config["programs_per_sm"],
        "segment": config["segment"],
    }
    try:
        row["us"] = _graph_us(lambda x: launch(pl, launch(pr, x, **config), **config), x)
    except Exception as exc:
        row["error"] = _error_text(exc)
    print(row, flush=True)
    return row


# decoder shapes of the decode and convert parts (random weights: speed does not depend on them)
SMOLLM2_SHAPE = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3
)
DRY_SHAPE = dict(vocab_size=256, hidden_size=72, intermediate_size=96, num_attention_heads=3, num_key_value_heads=3)


def shaped_llama(shape: dict, layers: int, seed: int = 0):
    """A LLaMA model of ``shape`` with ``layers`` decoder layers and random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, num_hidden_layers=layers, max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def runner_decode(model, prompt_tokens: int, gen_tokens: int, repeats: int, graphs: bool, device: str = "cuda") -> dict:
    """Median pp and tg tokens/s of batch-1 greedy decoding through ModelRunner (what `dsf
    generate` and `dsf serve` run), decode steps replayed from CUDA graphs or launched one
    by one; the first run warms up (Triton compiles, graphs are recorded)."""
    import statistics

    from dsf_runtime.benchmarks.decode import bench_prompt, decode_once
    from dsf_runtime.runner import ModelRunner

    ids = bench_prompt(model.config.vocab_size, prompt_tokens)
    runner = ModelRunner(model, slots=1, max_len=prompt_tokens + gen_tokens, cuda_graphs=graphs)
    pps, tgs = [], []
    for r in range(repeats + 1):
        pp_s, tg_s = decode_once(model, ids, gen_tokens, runner, sync=lambda: _sync(device))
        if r:
            pps.append(prompt_tokens / pp_s)
            tgs.append(gen_tokens / tg_s)
    row = {"pp_tok_s": statistics.median(pps), "tg_tok_s": statistics.median(tgs), "graphs": graphs}
    if graphs and runner.graphs is not None and runner.graphs.failed:
        row["error"] = f"graphs not recorded, eager steps: {runner.graphs.failed}"
    return row


def run_decode(
    stack_layers: int,
    sparsity: float,
    prompt_tokens: int = 128,
    gen_tokens: int = 64,
    repeats: int = 3,
    device: str = "cuda",
    dry_run: bool = False,
) -> list[dict]:
    """Dense fp16 and bf16 against DSF fp16 on each CUDA backend, each with decode steps
    replayed from CUDA graphs and launched eagerly, on a SmolLM2-135M-shaped model and a
    LLaMA-7B-shaped stack of ``stack_layers`` layers; a dry run takes tiny shapes and a
    few tokens, on the CPU (where graphs do not apply and only torch-csr runs the model)."""
    from dsf_runtime.benchmarks.decode import dsf_stack, llama7b_stack
    from dsf_runtime.patch import dsf_modules

    models = {
        "SmolLM2-135M shapes": lambda: shaped_llama(SMOLLM2_SHAPE, 30),
        f"LLaMA-7B-shaped stack x{stack_layers}": lambda: llama7b_stack(stack_layers),
    }
    if dry_run:
        prompt_tokens, gen_tokens, repeats = 8, 2, 1
        models = {"dry-run tiny": lambda: shaped_llama(DRY_SHAPE, stack_layers)}
    graph_modes = (True, False) if device == "cuda" else (False,)
    rows = []

    def measure(model, label: str, variant: str, backend: str) -> None:
        for graphs in graph_modes:
            row = {"model": label, "variant": variant, "backend": backend}
            try:
                row.update(runner_decode(model, prompt_tokens, gen_tokens, repeats, graphs, device))
            except Exception as exc:  # reported, the other rows still count
                row.update(graphs=graphs, error=_error_text(exc))
            print(row, flush=True)
            rows.append(row)

    for label, build in models.items():
        for dtype in (torch.float16, torch.bfloat16):
            model = build().to(device, dtype)
            measure(
                model,
                label,
                "dense " + {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype],
                "cuBLAS" if device == "cuda" else "torch (dry run)",
            )
            del model
            _free_cuda()
        model = dsf_stack(build(), sparsity, torch.float16).to(device, torch.float16)
        # the model path picks backends per device; on the CPU only torch-csr runs (the layer part
        # runs triton-bitmap's kernel in the interpreter)
        for backend in ("triton-bitmap", "torch-csr") if device == "cuda" else ("torch-csr",):
            for m in dsf_modules(model).values():
                m.set_backend(backend)
            measure(model, label, f"DSF {int(sparsity * 100)}% fp16", backend)
        del model
        _free_cuda()
    for r in rows:  # against dense fp16 of the same model, launched the same way
        same = [
            d for d in rows if d["model"] == r["model"] and d["variant"] == "dense fp16" and d["graphs"] == r["graphs"]
        ]
        dense = same[0] if same else {}
        if "tg_tok_s" in r and "tg_tok_s" in dense:
            r["tg_vs_dense_fp16"] = r["tg_tok_s"] / dense["tg_tok_s"]
    return rows


def run_convert(
    layers: int, preset_name: str = "paper", sparsity: float = 0.5, device: str = "cuda", dry_run: bool = False
) -> dict:
    """Seconds per decoder layer of the DSF converter on CUDA (SmolLM2-135M shapes); a dry
    run calibrates on 2 windows of 32 tokens with 2 DSF iterations."""
    from dsf_runtime.converters.calibrate import compress_sequential
    from dsf_runtime.converters.config import CALIB_PRESETS, preset
    from dsf_runtime.converters.methods import make_method

    model = shaped_llama(DRY_SHAPE if dry_run else SMOLLM2_SHAPE, layers)  # dry run: the logic, not the time
    config = model.config
    calib = CALIB_PRESETS[preset_name]
    if dry_run:
        calib = {**calib, "nsamples": 2, "seqlen": 32}
    ids = torch.randint(0, config.vocab_size, (calib["nsamples"], calib["seqlen"]))
    dsf = preset(preset_name, sparsity=sparsity, **({"outer_iters": 2, "finalize_iters": 1} if dry_run else {}))
    _sync(device)
    t0 = time.perf_counter()
    result = compress_sequential(
        model,
        ids,
        make_method("dsf", sparsity, dsf),
        batch_size=calib.get("batch_size", 8),
        device=device,
        progress=True,
    )
    seconds = time.perf_counter() - t0
    per_matrix = {}
    for r in result.reports:
        per_matrix.setdefault(r.name.split(".")[-1], []).append(r.seconds)
    return {
        "preset": preset_name,
        "layers": layers,
        "seconds": seconds,
        "seconds_per_layer": seconds / layers,
        "estimated_seconds_30_layers": 30 * seconds / layers,
        "seconds_per_matrix": {k: sum(v) / len(v) for k, v in per_matrix.items()},
        "mean_rel_error": sum(r.rel_error for r in result.reports) / len(result.reports),
    }


def run_gpu_bench(
    out_dir: str = "benchmarks/results/gpu",
    shapes: dict[str, tuple[int, int]] | None = None,
    batches: tuple[int, ...] = (1, 4, 16),
    sparsity: float = 0.5,
    stack_layers: int = 8,
    convert_layers: int = 3,
    parts: tuple[str, ...] = ("layer", "decode", "convert"),
    dry_run: bool = False,
) -> dict:
    from dsf_runtime.benchmarks.results_io import environment, markdown_table, plot_speedups, write_results

    device = _require_device(dry_run)
    import triton

    out = Path(out_dir)
    env = environment()
    env.update({"triton": triton.__version__, "cuda_runtime": torch.version.cuda})
    if dry_run:
        env["cuda"] = "dry run on the CPU (Triton interpreter; the times mean nothing)"
        shapes = shapes if shapes and all(o * i <= 1 << 16 for o, i in shapes.values()) else DRY_SHAPES
        batches = (1, 2)  # the vector and the tl.dot path
        stack_layers, convert_layers = min(stack_layers, 1), min(convert_layers, 1)
    payload: dict = {"benchmark": "gpu", "sparsity": sparsity, "environment": env, "dry_run": dry_run}
    files: dict[str, str] = {}
    if "layer" in parts:
        bandwidth = device_bandwidth(1 << 24 if dry_run else 1 << 30, device)
        env["device_copy_gb_s"] = bandwidth
        rows = run_layer(shapes or SHAPES, batches, sparsity, bandwidth, device=device)
        table = (
            f"{env['cuda']}; device copy bandwidth (read + write, same run): {bandwidth:.0f} GB/s; "
            f"times: triton.testing.do_bench median, L2 flushed before each call; 'graph': replayed from a CUDA "
            f"graph (GPU time; ratios use it), 'eager': called from Python (launch overhead included)\n\n"
            + markdown_table(
                rows,
                [
                    ("shape", "layer", ""),
                    ("batch", "batch", "d"),
                    ("impl", "implementation", ""),
                    ("us", "us (graph)", ".1f"),
                    ("us_eager", "us (eager)", ".1f"),
                    ("weight_mib", "weight MiB", ".1f"),
                    ("rel_err", "rel. error vs L@R", ".1e"),
                    ("gb_s", "GB/s", ".0f"),
                    ("pct_bw", "% of bw", ".0f"),
                    ("speedup_vs_fp16", "x vs fp16", ".2f"),
                    ("speedup_vs_bf16", "x vs bf16", ".2f"),
                    ("note", "note", ""),
                    ("error", "error", ""),
                ],
            )
        )
        files.update(
            {f"layer_{k}": str(v) for k, v in write_results(out, "gpu_layer", {**payload, "rows": rows}, table).items()}
        )
        plot_speedups(
            rows,
            out / "gpu_layer.png",
            "speedup_vs_fp16",
            "speed vs dense fp16 (higher is faster)",
            f"DSF {int(sparsity * 100)}% layer vs dense on {env['cuda']} (CUDA-graph replay, L2 flushed)",
        )
        files["layer_png"] = str(out / "gpu_layer.png")
        print(table, flush=True)
    if "tune" in parts:
        tune_shape = next(iter(DRY_SHAPES.values())) if dry_run else (4096, 4096)
        rows = run_tune(*tune_shape, sparsity=sparsity, device=device, dry_run=dry_run)
        entry = suggested_entry(rows)
        table = (
            f"{env['cuda']}; triton-bitmap launch settings, one {tune_shape[0]}x{tune_shape[1]} DSF layer (L then R), fp16, "
            f"CUDA-graph replay, L2 flushed; the fastest settings as a kernels/tuning.json entry for this GPU: "
            f"`{json.dumps(entry)}`\n\n"
            + markdown_table(
                [{**r, "fetch": "run" if r["segment"] else "column"} for r in rows],
                [
                    ("batch", "batch", "d"),
                    ("path", "path", ""),
                    ("block_r", "block rows", "d"),
                    ("wpi", "words/step", "d"),
                    ("num_warps", "warps", "d"),
                    ("programs_per_sm", "programs/SM", "d"),
                    ("fetch", "value fetch", ""),
                    ("us", "us", ".1f"),
                    ("error", "error", ""),
                ],
            )
        )
        files.update(
            {
                f"tune_{k}": str(v)
                for k, v in write_results(
                    out, "gpu_tune", {**payload, "rows": rows, "suggested_entry": entry}, table
                ).items()
            }
        )
        print(table, flush=True)
    if "decode" in parts:
        rows = run_decode(stack_layers, sparsity, device=device, dry_run=dry_run)
        table = (
            f"{env['cuda']}; random weights, batch-1 greedy decoding through the runner of `dsf generate` "
            f"and `dsf serve` (static KV cache), 128-token prompt, 64 new tokens; 'graphs': decode steps "
            f"replayed from CUDA graphs, else launched from Python; ratios against dense fp16 launched the same way\n\n"
            + markdown_table(
                [{**r, "graphs": "yes" if r["graphs"] else "no"} for r in rows],
                [
                    ("model", "model", ""),
                    ("variant", "weights", ""),
                    ("backend", "backend", ""),
                    ("graphs", "graphs", ""),
                    ("pp_tok_s", "pp tok/s", ".0f"),
                    ("tg_tok_s", "tg tok/s", ".1f"),
                    ("tg_vs_dense_fp16", "tg x dense fp16", ".2f"),
                    ("error", "error", ""),
                ],
            )
        )
        files.update(
            {
                f"decode_{k}": str(v)
                for k, v in write_results(out, "gpu_decode", {**payload, "rows": rows}, table).items()
            }
        )
        print(table, flush=True)
    if "convert" in parts:
        row = run_convert(convert_layers, sparsity=sparsity, device=device, dry_run=dry_run)
        table = (
            f"{env['cuda']}; DSF converter, `{row['preset']}` preset, SmolLM2-135M shapes (random weights): "
            f"{row['layers']} layers in {row['seconds']:.1f} s = {row['seconds_per_layer']:.1f} s/layer "
            f"(30 layers: ~{row['estimated_seconds_30_layers']:.0f} s)\n\n"
            + markdown_table(
                [{"matrix": k, "s": v} for k, v in row["seconds_per_matrix"].items()],
                [("matrix", "matrix", ""), ("s", "seconds (mean per layer)", ".2f")],
            )
        )
        files.update(
            {f"convert_{k}": str(v) for k, v in write_results(out, "gpu_convert", {**payload, **row}, table).items()}
        )
        print(table, flush=True)
    payload["files"] = files
    return payload
