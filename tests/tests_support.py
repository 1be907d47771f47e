"""Builders used by several test modules."""

from __future__ import annotations

from pathlib import Path

from conftest import make_tiny_llama


def save_tiny(path: Path, tokenizer, model_type: str = "llama", **overrides) -> Path:
    model = make_tiny_llama(len(tokenizer), model_type=model_type, **overrides)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def chat_tokenizer(tokenizer):
    """A copy of the tiny tokenizer with a small chat template (the real model brings its own)."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def api_error(resp, status: int) -> dict:
    """The OpenAI-shaped error object of ``resp``, after checking its status and fields."""
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def fail_on_call(fn, n: int, error: Exception):
    """``fn`` wrapped so that its ``n``-th call raises ``error`` (and every other call goes through)."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise error
        return fn(*args, **kwargs)

    return wrapper
