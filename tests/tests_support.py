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


def random_factors(model, scale: float, seed: int = 0, one_matrix=None) -> dict:
    """Random sparse factor pairs (L, R), 30% dense each and scaled by ``scale``, for every
    compressible linear of ``model``; ``one_matrix(name)`` true: one pruned matrix (W, None)
    at 50% instead, scaled by 0.1."""
    from dsf_runtime.models import compressible_linears
    from helpers import random_sparse

    factors = {}
    for i, name in enumerate(compressible_linears(model)):
        out_f, in_f = model.get_submodule(name).weight.shape
        rank = min(out_f, in_f)
        if one_matrix is not None and one_matrix(name):
            factors[name] = (random_sparse(out_f, in_f, 0.5, seed=2 * i + seed) * 0.1, None)
            continue
        factors[name] = (
            random_sparse(out_f, rank, 0.3, seed=2 * i + seed) * scale,
            random_sparse(rank, in_f, 0.3, seed=2 * i + 1 + seed) * scale,
        )
    return factors


def tiny_dsf_llama(value_dtype=None, seed: int = 0, one_matrix=None):
    """A tiny random LLaMA whose linear layers are random sparse DSF pairs (bitmap format,
    bf16 values by default): for runtime tests that need a whole model, not its quality.
    ``one_matrix(name)`` true: that linear is one pruned matrix instead (rank None)."""
    import torch

    from dsf_runtime.patch import replace_with_factors

    model = make_tiny_llama(vocab_size=128, seed=seed)
    factors = random_factors(model, 0.3, one_matrix=one_matrix)
    replace_with_factors(model, factors, value_dtype=value_dtype or torch.bfloat16)
    return model


def tiny_dsf_checkpoint(path, tokenizer, seed: int = 0, one_matrix=None, **overrides):
    """A saved tiny DSF LLaMA with random sparse factor pairs (bitmap, bf16 values) whose
    attention heads are 64 wide (vLLM's CPU attention takes no narrower ones);
    ``one_matrix(name)`` true: that linear is one pruned matrix instead."""
    from conftest import make_tiny_llama
    from dsf_runtime.converters.pack import write_packed

    shape = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    model = make_tiny_llama(len(tokenizer), seed=seed, max_position_embeddings=512, **{**shape, **overrides})
    factors = random_factors(model, 0.2, seed=seed, one_matrix=one_matrix)
    return write_packed(model, tokenizer, factors, path, sparsity=0.5)


CT_FIXTURES = Path(__file__).parent / "fixtures" / "compressed_tensors"


def edit_ct_config(path: Path, change) -> None:
    """Apply ``change`` to the quantization_config of a checkpoint's config.json."""
    import json

    config = json.loads((path / "config.json").read_text())
    change(config["quantization_config"])
    (path / "config.json").write_text(json.dumps(config))


def edit_ct_tensors(path: Path, change) -> None:
    """Apply ``change`` to the state dict of a checkpoint's model.safetensors."""
    from safetensors.torch import load_file, save_file

    state = load_file(path / "model.safetensors")
    change(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
