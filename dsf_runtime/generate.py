"""Greedy or sampled text generation with timing, for the CLI and the demo."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Generation:
    text: str
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


@torch.no_grad()
def generate_text(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_tokens: int = 32,
    chat: bool = False,
    fixed_length: bool = False,
) -> Generation:
    """Greedy completion of ``prompt``; ``fixed_length`` ignores EOS (for timing)."""
    if chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    device = next(model.parameters()).device
    ids = ids.to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens if fixed_length else 0,
        do_sample=False,
        pad_token_id=pad,
    )
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1] :]
    return Generation(tokenizer.decode(new, skip_special_tokens=True), int(new.numel()), seconds)
