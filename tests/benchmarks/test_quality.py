"""Perplexity with strided windows against a direct computation."""

from __future__ import annotations

import math

import pytest
import torch

from dsf_runtime.benchmarks.quality import perplexity


def direct_perplexity(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids.unsqueeze(0)).logits[0, :-1]
    return math.exp(float(torch.nn.functional.cross_entropy(logits, ids[1:])))


@pytest.fixture(scope="module")
def model():
    from conftest import make_tiny_llama

    return make_tiny_llama(97, num_hidden_layers=1)


def test_single_window_equals_direct(model):
    ids = torch.randint(0, 97, (50,), generator=torch.Generator().manual_seed(0))
    assert perplexity(model, ids, window=64, stride=64, progress=False) == pytest.approx(direct_perplexity(model, ids), rel=1e-5)


def test_every_token_scored_once_with_overlap(model):
    """With window = n and any stride the first window already scores everything."""
    ids = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(1))
    for stride in (1, 7, 40):
        assert perplexity(model, ids, window=40, stride=stride, progress=False) == pytest.approx(
            direct_perplexity(model, ids), rel=1e-5
        )


def test_uniform_model_has_vocab_perplexity():
    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, use_cache=False):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 13)})()

    ids = torch.randint(0, 13, (100,))
    assert perplexity(Uniform(), ids, window=16, stride=5, progress=False) == pytest.approx(13.0, rel=1e-6)


def test_bad_arguments(model):
    with pytest.raises(ValueError):
        perplexity(model, torch.arange(10), window=8, stride=16)
    with pytest.raises(ValueError):
        perplexity(model, torch.arange(1), window=8, stride=4)
