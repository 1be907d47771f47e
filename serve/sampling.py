"""Sampling parameters and the pure function that turns logits into the next token.

Every parameter value that validation lets through gives a well-defined
distribution: temperatures below ``SAMPLING_EPS`` mean greedy, logits are shifted
so the largest is 0 before they are scaled (no overflow at any temperature),
penalised logits are clamped to finite fp32, and top-p / top-k always keep the
most likely token. Only logits the model itself made non-finite (NaN, +inf) fail,
and then only the request they belong to (``SamplingError``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dsf_runtime.errors import DSFError

SAMPLING_EPS = 1e-5  # temperatures below this are greedy (dividing by them overflows fp32)
MIN_LOGPROB = -9999.0  # reported instead of -inf (JSON has no infinity)
_FLT_MAX = torch.finfo(torch.float32).max


class SamplingError(DSFError):
    """The model's logits for one request are not a distribution (NaN or +inf): that request fails."""


class SamplingParams(BaseModel):
    """What one request asks of generation (validated once, at the API edge)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0: off
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    seed: int | None = None  # any integer: the generator is seeded with seed mod 2**64
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
        return self.temperature < SAMPLING_EPS

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing to compute but an argmax (the engine batches these)."""
        return self.greedy and self.repetition_penalty == 1.0 and self.logprobs is None

    def generator_seed(self) -> int | None:
        """The seed as torch.Generator.manual_seed takes it (0 .. 2**64-1)."""
        return None if self.seed is None else self.seed % 2**64


@dataclass
class TokenChoice:
    """The chosen token, its log-probability under the model, and top alternatives."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


def check_logits(logits: torch.Tensor) -> None:
    """Raise SamplingError unless the maximum of ``logits`` (vocab,) is finite: max propagates
    NaN, so this one reduction catches NaN, +inf and rows that are all -inf."""
    if not math.isfinite(float(logits.max())):
        raise SamplingError("the model produced non-finite logits (NaN or inf) for this request")


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None) -> torch.Tensor:
    """Repetition penalty, temperature, top-k and top-p on one row of logits (vocab,), fp32.
    Filtered-out entries become -inf; the result's maximum is finite and at least one
    entry survives. Greedy requests only get the penalty."""
    check_logits(logits)
    logits = logits.float().clone()
    if params.repetition_penalty != 1.0 and seen is not None and seen.numel():
        picked = logits[seen].double()  # fp64: a tiny penalty must not turn into a division by zero
        penalised = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
        logits[seen] = penalised.clamp(-_FLT_MAX, _FLT_MAX).float()
    if params.greedy:
        return logits
    # shift so the largest logit is 0: dividing by any temperature >= SAMPLING_EPS cannot overflow
    logits = (logits - logits.max()) / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits[logits < kth] = float("-inf")
    if params.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        probs = torch.softmax(ordered.double(), dim=-1)
        drop = probs.cumsum(-1) - probs >= params.top_p  # keep the token that crosses top_p
        drop[0] = False  # the most likely token always survives (top_p can be below fp precision)
        logits[order[drop]] = float("-inf")
    return logits


def choose_token(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None, generator: torch.Generator | None
) -> TokenChoice:
    """Pick the next token from raw logits (vocab,); log-probabilities come from the raw distribution.
    Raises SamplingError when the model's logits are not a distribution."""
    processed = process_logits(logits, params, seen)
    if params.greedy:
        token = int(torch.argmax(processed))
    else:
        probs = torch.softmax(processed, dim=-1)  # the maximum is 0: the sum is >= 1, never NaN
        token = int(torch.multinomial(probs, 1, generator=generator))
    choice = TokenChoice(token)
    if params.logprobs is not None:
        logp = torch.log_softmax(logits.float(), dim=-1)
        choice.logprob = _finite_logprob(float(logp[token]))
        if params.logprobs:
            values, ids = torch.topk(logp, min(params.logprobs, logp.numel()))
            choice.top = [(int(i), _finite_logprob(float(v))) for i, v in zip(ids, values)]
    return choice


def _finite_logprob(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB
