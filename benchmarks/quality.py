"""`dsf bench quality`: held-out perplexity per compression method and sparsity."""

from __future__ import annotations

import json

from dsf_runtime.evaluate import perplexity


def run_quality_bench(
    model: str,
    methods: list[str],
    sparsities: list[float],
    *,
    preset_name: str = "fast",
    out_dir: str = "benchmarks/results",
    work_dir: str = "out/bench-quality",
    eval_tokens: int = 32768,
    nsamples: int | None = None,
    seqlen: int | None = None,
    progress: bool = True,
) -> dict:
    """Compress ``model`` with every method at every sparsity (checkpoints kept in
    ``work_dir`` and reused when present), evaluate held-out perplexity, and write
    quality.json / quality.md / quality.png under ``out_dir``."""
    import time
    from pathlib import Path

    from dsf_runtime.checkpoint import is_dsf_checkpoint, load_model, read_quant_config
    from dsf_runtime.data import evaluation_text, tokenize
    from dsf_runtime.converters.pipeline import make_job, run_compress
    from dsf_runtime.models import load_dense

    rows = []
    dense, tokenizer = load_dense(model)
    ids = tokenize(tokenizer, evaluation_text())
    n_eval = min(ids.numel(), eval_tokens or ids.numel())
    t0 = time.perf_counter()
    dense_ppl = perplexity(dense, ids, max_tokens=n_eval, progress=progress)
    rows.append(
        {
            "method": "dense",
            "sparsity": 0.0,
            "perplexity": dense_ppl,
            "compress_seconds": None,
            "eval_seconds": time.perf_counter() - t0,
            "backend": "dense",
        }
    )
    del dense
    for sparsity in sparsities:
        for method in methods:
            ckpt = Path(work_dir) / f"{method.replace(':', '-')}-{preset_name}-s{sparsity:g}"
            seconds = None
            if is_dsf_checkpoint(ckpt):
                log_file = ckpt / "compression_log.json"
                seconds = json.loads(log_file.read_text())["seconds"] if log_file.exists() else None
            else:
                job = make_job(
                    model,
                    ckpt,
                    sparsity=sparsity,
                    preset_name=preset_name,
                    method=method,
                    nsamples=nsamples,
                    seqlen=seqlen,
                    progress=progress,
                )
                _, result = run_compress(job)
                seconds = result.seconds
            _, quant = read_quant_config(ckpt)
            # Quality does not depend on the kernel: evaluate with the dense reference
            # backend (unpacked factors, two dense matmuls), much faster than CSR on CPU.
            sparse, _ = load_model(ckpt, backend="dense-ref", with_tokenizer=False)
            t0 = time.perf_counter()
            ppl = perplexity(sparse, ids, max_tokens=n_eval, progress=progress)
            nnz = sum(e.nnz_left + e.nnz_right for e in quant.modules.values())
            dense_count = sum(e.out_features * e.in_features for e in quant.modules.values())
            rows.append(
                {
                    "method": method,
                    "sparsity": sparsity,
                    "perplexity": ppl,
                    "compress_seconds": seconds,
                    "eval_seconds": time.perf_counter() - t0,
                    "backend": "dense-ref",
                    "density": nnz / dense_count,
                    "checkpoint": str(ckpt),
                }
            )
            del sparse
            # every finished row is written at once: a long run that is stopped keeps its results
            _write_quality(rows, dense_ppl, model, preset_name, n_eval, Path(out_dir))
    return _write_quality(rows, dense_ppl, model, preset_name, n_eval, Path(out_dir))


def _write_quality(rows: list[dict], dense_ppl: float, model: str, preset_name: str, n_eval: int, out_dir) -> dict:
    """Gaps to dense and to SparseGPT at the same sparsity; JSON, markdown and PNG."""
    from dsf_runtime.benchmarks.results_io import environment, markdown_table, write_results

    for row in rows:
        row["gap"] = row["perplexity"] - dense_ppl
    for sparsity in {r["sparsity"] for r in rows}:
        ref = next((r for r in rows if r["method"] == "sparsegpt" and r["sparsity"] == sparsity), None)
        for r in rows:
            if r["sparsity"] == sparsity and ref is not None and ref["gap"] > 0:
                r["gap_vs_sparsegpt"] = r["gap"] / ref["gap"]
    payload = {
        "benchmark": "quality",
        "model": model,
        "preset": preset_name,
        "eval": {"text": "Pride and Prejudice (held out)", "tokens": n_eval, "window": 1024, "stride": 512},
        "environment": environment(),
        "rows": rows,
    }
    table = markdown_table(
        rows,
        [
            ("method", "method", ""),
            ("sparsity", "sparsity", ".2f"),
            ("density", "nnz / dense", ".3f"),
            ("perplexity", "ppl", ".3f"),
            ("gap", "ppl - dense", ".3f"),
            ("gap_vs_sparsegpt", "gap / SparseGPT gap", ".2f"),
            ("compress_seconds", "compress s", ".0f"),
        ],
    )
    paths = write_results(out_dir, "quality", payload, table)
    _plot(rows, dense_ppl, out_dir / "quality.png", model)
    paths["png"] = out_dir / "quality.png"
    payload["files"] = {k: str(v) for k, v in paths.items()}
    payload["table"] = table
    return payload


def _plot(rows: list[dict], dense_ppl: float, path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        pts = sorted((r["sparsity"], r["perplexity"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.axhline(dense_ppl, color="black", linestyle="--", linewidth=1, label=f"dense ({dense_ppl:.2f})")
    ax.set_xlabel("sparsity (fraction of weights removed; DSF counts both factors)")
    ax.set_ylabel("perplexity (held-out Austen)")
    ax.set_yscale("log")
    ax.set_title(f"{model}: perplexity vs sparsity at equal nonzeros")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
