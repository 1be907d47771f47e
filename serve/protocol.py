"""OpenAI-compatible request bodies (validated with pydantic) and the SamplingParams they map to.

Fields OpenAI defines and we honour are typed here; a few extensions that vLLM
and llama.cpp also accept (top_k, repetition_penalty, ignore_eos,
stop_token_ids) too. Anything else is allowed through and reported by the app
as ignored, so clients that send extra fields keep working.

Every body is checked for lone surrogates (U+D800..U+DFFF, which JSON's \\u escapes
can carry but no tokenizer or UTF-8 encoder accepts) before its fields are read,
and non-finite numbers (NaN, Infinity) are refused.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from dsf_runtime.serve.sampling import SamplingParams


SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator takes, signed or unsigned


def lone_surrogate_at(value, path: str = "") -> str | None:
    """The path (e.g. ``messages.0.content``) of the first string in a decoded JSON value
    (keys included) that holds a lone surrogate, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        where = f"{path}.{key}" if path else str(key)
        if isinstance(key, str) and lone_surrogate_at(key) is not None:
            return where
        found = lone_surrogate_at(item, where)
        if found is not None:
            return found
    return None


class _Body(BaseModel):
    """A request body: extra fields allowed (and reported as ignored), valid Unicode only."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        where = lone_surrogate_at(data)
        if where is not None:
            raise PydanticCustomError(
                "invalid_unicode",
                "{param}: the text is not valid Unicode (a lone surrogate, U+D800..U+DFFF)",
                {"param": where.encode("utf-8", "backslashreplace").decode("utf-8")},
            )
        return data


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Common(_Body):
    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    # extensions (vLLM / llama.cpp spelling)
    top_k: int | None = Field(None, ge=-1)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, v):
        if v is not None and not SEED_MIN <= v <= SEED_MAX:
            raise ValueError(f"seeds must be integers from {SEED_MIN} to {SEED_MAX}")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported; use repetition_penalty")
        return self

    def _sampling(self, max_tokens: int, logprobs: int | None, seed_offset: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            repetition_penalty=self.repetition_penalty or 1.0,
            seed=None if self.seed is None else self.seed + seed_offset,
            stop=tuple(self.stop or ()),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        if self.suffix:
            raise ValueError("suffix (insertion) is not supported by this model")
        if self.best_of not in (None, self.n):
            raise ValueError("best_of must equal n (server-side best-of is not supported)")
        if self.echo and self.stream:
            raise ValueError("echo is not supported with stream")
        return self

    def sampling(self, max_tokens: int, index: int) -> SamplingParams:
        return self._sampling(max_tokens, self.logprobs, index)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def template_dict(self) -> dict:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def template_messages(self) -> list[dict]:
        return [m.template_dict() for m in self.messages]

    def sampling(self, max_tokens: int, index: int) -> SamplingParams:
        return self._sampling(max_tokens, (self.top_logprobs or 0) if self.logprobs else None, index)


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]
