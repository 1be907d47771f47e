"""Perplexity with strided windows on held-out text (`dsf eval`, `dsf compare`, the quality benchmark)."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    window: int = 1024,
    stride: int = 512,
    max_tokens: int | None = None,
    progress: bool = True,
) -> float:
    """exp(mean NLL) of the 1-D token sequence ``ids`` with sliding windows.

    Each window of ``window`` tokens scores only the tokens not scored by the previous
    window (the last ``stride`` ones, all of them for the first window), so every
    scored token sees at least ``window - stride`` tokens of context."""
    if stride < 1 or window < 2 or stride > window:
        raise ValueError("need 1 <= stride <= window and window >= 2")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel()
    if n < 2:
        raise ValueError("need at least 2 tokens to measure perplexity")
    device = next(model.parameters()).device
    nll_sum, count, prev_end = 0.0, 0, 0
    starts = list(range(0, max(1, n - 1), stride))
    for begin in tqdm(starts, desc="perplexity", unit="window", disable=not progress):
        end = min(begin + window, n)
        chunk = ids[begin:end].unsqueeze(0).to(device)
        logits = model(input_ids=chunk, use_cache=False).logits.float()  # (1, T, vocab)
        scored_from = max(prev_end, begin + 1)  # first target position not yet scored
        if scored_from < end:
            targets = ids[scored_from:end].to(device)
            pred = logits[0, scored_from - begin - 1 : end - begin - 1]
            nll_sum += float(torch.nn.functional.cross_entropy(pred, targets, reduction="sum"))
            count += targets.numel()
        prev_end = end
        if end == n:
            break
    return math.exp(nll_sum / count)
