"""generate_text: the runner's greedy decode gives what transformers' generate gives."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_llama
from dsf_runtime.errors import ConfigError
from dsf_runtime.generate import generate_text


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("prompt", ["Elizabeth was", "It is a truth universally acknowledged"])
def test_greedy_equals_transformers_generate(tiny_tokenizer, model_type, prompt):
    model = make_tiny_llama(len(tiny_tokenizer), model_type=model_type)
    ids = tiny_tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=20,
            min_new_tokens=20,
            do_sample=False,
            pad_token_id=tiny_tokenizer.eos_token_id,
        )[0, ids.shape[1] :]
    out = generate_text(model, tiny_tokenizer, prompt, 20, fixed_length=True)
    assert out.new_tokens == 20 and out.text == tiny_tokenizer.decode(ref, skip_special_tokens=True)


def test_stops_at_eos_unless_fixed_length(tiny_tokenizer, monkeypatch):
    from dsf_runtime.runner import ModelRunner

    model = make_tiny_llama(len(tiny_tokenizer))
    real = ModelRunner._finish

    def eos_first(self, x):  # EOS (id 2) the most likely token at every step
        logits = real(self, x).clone()
        logits[:, 2] = logits.max() + 1
        return logits

    monkeypatch.setattr(ModelRunner, "_finish", eos_first)
    assert generate_text(model, tiny_tokenizer, "Anne", 10).new_tokens == 1
    assert generate_text(model, tiny_tokenizer, "Anne", 10, fixed_length=True).new_tokens == 10


def test_too_long_is_a_clear_error(tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer))
    with pytest.raises(ConfigError, match="exceed the model's context of 256"):
        generate_text(model, tiny_tokenizer, "Anne", 10_000)
