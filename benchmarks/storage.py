"""Bytes per format: the linear layers of a checkpoint, or a LLaMA-7B-shaped decoder
layer with random factors at DSF's densities, in every registered format."""

from __future__ import annotations

import torch

from dsf_runtime.converters.factorize import split_budget
from dsf_runtime.report import format_bytes_of, model_format_bytes  # noqa: F401  (used by the storage bench)

LLAMA7B_LAYER = {  # (out, in) of one LLaMA-7B decoder layer's linears
    "q_proj": (4096, 4096),
    "k_proj": (4096, 4096),
    "v_proj": (4096, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (11008, 4096),
    "up_proj": (11008, 4096),
    "down_proj": (4096, 11008),
}


def random_dsf_pair(out_f: int, in_f: int, sparsity: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random factors with DSF's shapes and exact nonzero budget (uniform masks)."""
    g = torch.Generator().manual_seed(seed)
    r = min(out_f, in_f)
    b = split_budget(out_f, in_f, sparsity)
    nnz_l, nnz_r = (b.square, b.other) if b.square_is_left else (b.other, b.square)

    def mat(rows, cols, nnz):
        flat = torch.zeros(rows * cols)
        flat[torch.randperm(rows * cols, generator=g)[:nnz]] = torch.randn(nnz, generator=g) * 0.02
        return flat.view(rows, cols)

    return mat(out_f, r, nnz_l), mat(r, in_f, nnz_r)


def llama7b_layer_bytes(sparsity: float = 0.5) -> tuple[dict[str, int], int]:
    """(bytes per format, dense bf16 bytes) of one LLaMA-7B-shaped layer at DSF densities."""
    mats, dense = [], 0
    for i, (out_f, in_f) in enumerate(LLAMA7B_LAYER.values()):
        L, R = random_dsf_pair(out_f, in_f, sparsity, seed=i)
        mats += [L, R]
        dense += 2 * out_f * in_f
    return format_bytes_of(mats), dense


def run_storage_bench(
    checkpoint: str | None, dense: str | None, out_dir: str, sparsity: float = 0.5, load_repeats: int = 5
) -> dict:
    """Bytes per format (LLaMA-7B-shaped layer; the checkpoint if given) and, with
    both a dense model and a checkpoint, load-to-first-token and load memory (median of
    ``load_repeats`` fresh-process loads each, dense and DSF taking turns)."""
    from pathlib import Path

    from dsf_runtime.benchmarks.load import measure_alternating
    from dsf_runtime.benchmarks.results_io import environment, markdown_table, write_results
    from dsf_runtime.checkpoint import load_model

    rows = []
    sizes, dense_bytes = llama7b_layer_bytes(sparsity)
    for fmt, nbytes in sizes.items():
        rows.append(
            {
                "subject": f"LLaMA-7B layer, random DSF {sparsity:g}",
                "format": fmt,
                "mib": nbytes / 2**20,
                "vs_bf16": nbytes / dense_bytes,
            }
        )
    if checkpoint:
        model, _ = load_model(checkpoint, with_tokenizer=False, backend="dense-ref")
        sizes, dense_bytes = model_format_bytes(model)
        for fmt, nbytes in sizes.items():
            rows.append(
                {
                    "subject": Path(checkpoint).name,
                    "format": fmt,
                    "mib": nbytes / 2**20,
                    "vs_bf16": nbytes / dense_bytes,
                }
            )
    loads = []
    if checkpoint and dense:
        from dsf_runtime.models import resolve_model_dir

        dense_run, dsf_run = measure_alternating([str(resolve_model_dir(dense)), checkpoint], repeats=load_repeats)
        loads = [dict(dense_run, model="dense"), dict(dsf_run, model="DSF")]
    payload = {"benchmark": "storage", "environment": environment(), "bytes": rows, "load": loads}
    table = markdown_table(
        rows,
        [
            ("subject", "linears of", ""),
            ("format", "format", ""),
            ("mib", "MiB", ".1f"),
            ("vs_bf16", "x dense bf16", ".3f"),
        ],
    )
    if loads:
        table += "\n\n" + markdown_table(
            loads,
            [
                ("model", "model", ""),
                ("backend", "backend", ""),
                ("load_seconds", "load s", ".2f"),
                ("first_token_seconds", "disk to first token s", ".2f"),
                ("model_tensor_mib", "tensors MiB", ".0f"),
                ("load_peak_over_model", "load RSS growth / tensors", ".2f"),
                ("load_peak_over_final", "peak while loading / RSS after first token", ".2f"),
            ],
        )
    paths = write_results(Path(out_dir), "storage", payload, table)
    payload["files"] = {k: str(v) for k, v in paths.items()}
    payload["table"] = table
    return payload
