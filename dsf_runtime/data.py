"""Calibration and evaluation text: the bundled Austen corpus or the user's files."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch

from dsf_runtime.errors import DataError

CALIBRATION_BOOKS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "sensesensibility")
EVALUATION_BOOK = "prideprejudice"  # never used for calibration


def corpus_file(book: str) -> Path:
    path = Path(str(resources.files("dsf_runtime.corpus") / f"{book}.txt"))
    if not path.is_file():
        raise DataError(f"bundled corpus file {path.name} is missing from the installation")
    return path


def read_texts(files: Sequence[str | os.PathLike]) -> str:
    parts = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise DataError(f"text file {path} does not exist")
        try:
            parts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not UTF-8 text: {exc}") from None
    return "\n\n".join(parts)


def calibration_text(files: Sequence[str | os.PathLike] | None = None) -> str:
    """The user's files, or the five bundled calibration novels."""
    return read_texts(files or [corpus_file(b) for b in CALIBRATION_BOOKS])


def evaluation_text(files: Sequence[str | os.PathLike] | None = None) -> str:
    """The user's files, or the held-out novel (Pride and Prejudice)."""
    return read_texts(files or [corpus_file(EVALUATION_BOOK)])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """All token ids of ``text`` as a 1-D LongTensor, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens: (nsamples, seqlen)."""
    need = nsamples * seqlen
    if ids.numel() < need:
        raise DataError(
            f"calibration text has {ids.numel()} tokens; {nsamples} windows of {seqlen} tokens need at least "
            f"{need}: give more text, fewer --nsamples or a shorter --seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
