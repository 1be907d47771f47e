"""Dense vs DSF side by side: perplexity on held-out text, bytes of the linear
layers, decode tokens/s and a greedy completion, measured in one run."""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

from dsf_runtime.checkpoint import backend_summary, load_any
from dsf_runtime.data import evaluation_text, tokenize
from dsf_runtime.evaluate import perplexity
from dsf_runtime.generate import generate_text
from dsf_runtime.report import format_bytes, linear_bytes


@dataclass
class Row:
    label: str
    backend: str
    linear_bytes: int
    perplexity: float
    tokens_per_second: float
    completion: str


def measure(
    label: str,
    name_or_path,
    prompt: str,
    max_tokens: int,
    eval_tokens: int,
    device: str,
    backend: str,
    dtype: torch.dtype | None = None,
) -> Row:
    model, tokenizer = load_any(name_or_path, device=device, backend=backend, dtype=dtype)
    ids = tokenize(tokenizer, evaluation_text())
    ppl = perplexity(model, ids, window=1024, stride=512, max_tokens=eval_tokens)
    generate_text(model, tokenizer, prompt, 2)  # warm-up
    gen = generate_text(model, tokenizer, prompt, max_tokens, fixed_length=True)
    text = generate_text(model, tokenizer, prompt, max_tokens).text
    row = Row(label, backend_summary(model), linear_bytes(model), ppl, gen.tokens_per_second, text)
    del model
    gc.collect()
    return row


def compare(
    dense,
    checkpoint,
    prompt: str,
    max_tokens: int = 32,
    eval_tokens: int = 8192,
    device: str = "cpu",
    backend: str = "auto",
    dtype: torch.dtype | None = None,
) -> list[Row]:
    """Both models in ``dtype`` (None: the dense one in float32, the checkpoint in its own)."""
    with torch.inference_mode():
        return [
            measure("dense", dense, prompt, max_tokens, eval_tokens, device, "auto", dtype),
            measure("DSF", checkpoint, prompt, max_tokens, eval_tokens, device, backend, dtype),
        ]


def format_table(rows: list[Row]) -> str:
    base = rows[0]
    lines = [
        f"{'model':6s} | {'ppl (held-out)':>14s} | {'linear bytes':>12s} | {'vs dense':>8s} | {'tok/s':>6s} | backend",
        "-" * 80,
    ]
    for r in rows:
        lines.append(
            f"{r.label:6s} | {r.perplexity:14.3f} | {format_bytes(r.linear_bytes):>12s} | "
            f"{r.linear_bytes / base.linear_bytes:8.2f} | {r.tokens_per_second:6.1f} | {r.backend}"
        )
    lines.append("")
    for r in rows:
        lines.append(f"{r.label} completion: {r.completion.strip()!r}")
    return "\n".join(lines)
