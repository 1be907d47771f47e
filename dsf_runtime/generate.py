"""Greedy text generation with timing (`dsf generate`, `dsf compare`, the demo), through the
same lean forward and KV cache the server's engine decodes with (dsf_runtime.runner)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from dsf_runtime.errors import ConfigError
from dsf_runtime.runner import ModelRunner, eos_token_ids


@dataclass
class Generation:
    text: str
    new_tokens: int
    seconds: float
    token_ids: tuple[int, ...] = ()  # the new tokens (e.g. to compare engines token by token)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


def prompt_ids(tokenizer, prompt: str, chat: bool = False) -> list[int]:
    """The prompt's token ids; ``chat`` wraps it as one user message in the chat template."""
    if chat:
        return list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True
            )["input_ids"]
        )
    return list(tokenizer(prompt)["input_ids"])


@torch.no_grad()
def generate_text(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_tokens: int = 32,
    chat: bool = False,
    fixed_length: bool = False,
) -> Generation:
    """Greedy completion of ``prompt``: it stops at an end-of-sequence token, or with
    ``fixed_length`` never picks one (their logits are masked, for timing a fixed count)."""
    ids = prompt_ids(tokenizer, prompt, chat)
    if max_tokens < 1 or not ids:
        raise ConfigError("need a non-empty prompt and max_tokens >= 1")
    runner = ModelRunner(model, slots=1, max_len=len(ids) + max_tokens)
    if len(ids) + max_tokens > runner.max_len:
        raise ConfigError(
            f"{len(ids)} prompt tokens + {max_tokens} new ones exceed the model's context of {runner.max_len} tokens"
        )
    eos = sorted(eos_token_ids(model, tokenizer))
    start = time.perf_counter()
    logits = runner.prefill(0, ids)
    new: list[int] = []
    while True:
        if fixed_length and eos:
            logits = logits.clone()
            logits[[t for t in eos if t < logits.numel()]] = float("-inf")
        token = int(torch.argmax(logits))
        new.append(token)
        if len(new) == max_tokens or (token in eos and not fixed_length):
            break
        logits = runner.decode([token], [len(ids) + len(new) - 1])[0]
    seconds = time.perf_counter() - start
    return Generation(tokenizer.decode(new, skip_special_tokens=True), len(new), seconds, tuple(new))
