"""Logit processing and token choice: each knob does what its name says."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from dsf_runtime.serve.sampling import SamplingParams, choose_token, process_logits


def test_greedy_is_argmax_and_logprob_is_from_the_raw_distribution():
    logits = torch.tensor([0.1, 2.0, -1.0, 1.5])
    choice = choose_token(logits, SamplingParams(temperature=0, logprobs=2), None, None)
    assert choice.token == 1
    expected = torch.log_softmax(logits, -1)
    assert math.isclose(choice.logprob, float(expected[1]), rel_tol=1e-6)
    assert [t for t, _ in choice.top] == [1, 3]


def test_top_k_keeps_exactly_k():
    logits = torch.arange(10.0)
    out = process_logits(logits, SamplingParams(top_k=3), None)
    assert torch.isfinite(out).nonzero().flatten().tolist() == [7, 8, 9]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=2, max_size=40), st.floats(0.05, 0.99))
def test_top_p_keeps_the_smallest_set_reaching_p(values, top_p):
    logits = torch.tensor(values)
    kept = torch.isfinite(process_logits(logits, SamplingParams(top_p=top_p), None))
    probs = torch.softmax(logits, -1)
    assert probs[kept].sum() >= top_p - 1e-6  # enough mass
    # dropping the least likely kept token would fall below p (minimal), unless ties decide
    if kept.sum() > 1:
        weakest = probs[kept].min()
        assert probs[kept].sum() - weakest < top_p + 1e-6
    assert kept[torch.argmax(logits)]  # the most likely token always survives


def test_repetition_penalty_pushes_seen_tokens_down():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = process_logits(logits, SamplingParams(temperature=0, repetition_penalty=2.0), torch.tensor([0, 1]))
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_seeded_sampling_is_reproducible_and_follows_temperature():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, seed=7)

    def draws(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return [choose_token(logits, params, None, g).token for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    cold = torch.Generator().manual_seed(0)
    picks = {choose_token(logits, SamplingParams(temperature=0.01), None, cold).token for _ in range(20)}
    assert picks == {int(torch.argmax(logits))}


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -0.1},
        {"temperature": 3},
        {"top_p": 0},
        {"top_k": -1},
        {"max_tokens": 0},
        {"stop": ("",)},
        {"stop": ("a", "b", "c", "d", "e")},
        {"logprobs": 21},
        {"repetition_penalty": 0},
    ],
)
def test_invalid_parameters_are_rejected(bad):
    with pytest.raises(ValidationError):
        SamplingParams(**bad)
