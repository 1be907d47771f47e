"""Builders used by several test modules."""

from __future__ import annotations

from pathlib import Path

from conftest import make_tiny_llama


def save_tiny(path: Path, tokenizer, model_type: str = "llama", **overrides) -> Path:
    model = make_tiny_llama(len(tokenizer), model_type=model_type, **overrides)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
