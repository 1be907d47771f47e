"""Sampling parameters and the pure function that turns logits into the next token."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator


class SamplingParams(BaseModel):
    """What one request asks of generation (validated once, at the API edge)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0: off
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)  # top alternatives per token; None: off

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        if len(v) > 4:
            raise ValueError("at most 4 stop strings")
        return v

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class TokenChoice:
    """The chosen token, its log-probability under the model, and top alternatives."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None) -> torch.Tensor:
    """Repetition penalty, temperature, top-k and top-p on one row of logits (vocab,), fp32.
    Filtered-out entries become -inf; greedy requests only get the penalty."""
    logits = logits.float().clone()
    if params.repetition_penalty != 1.0 and seen is not None and seen.numel():
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits[logits < kth] = float("-inf")
    if params.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(ordered, dim=-1) >= params.top_p  # keep the token that crosses top_p
        logits[order[drop]] = float("-inf")
    return logits


def choose_token(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None, generator: torch.Generator | None
) -> TokenChoice:
    """Pick the next token from raw logits (vocab,); log-probabilities come from the raw distribution."""
    processed = process_logits(logits, params, seen)
    if params.greedy:
        token = int(torch.argmax(processed))
    else:
        probs = torch.softmax(processed, dim=-1)
        token = int(torch.multinomial(probs, 1, generator=generator))
    choice = TokenChoice(token)
    if params.logprobs is not None:
        logp = torch.log_softmax(logits.float(), dim=-1)
        choice.logprob = float(logp[token])
        if params.logprobs:
            values, ids = torch.topk(logp, params.logprobs)
            choice.top = [(int(i), float(v)) for i, v in zip(ids, values)]
    return choice
