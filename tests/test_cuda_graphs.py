"""Graph-replayed decode (dsf_runtime.cuda_graphs): the static-buffer logic checked on the
CPU with a recorder that reruns the recorded step, against the runner's eager decode."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import make_tiny_llama
from dsf_runtime.cuda_graphs import MIN_SPAN, GraphedDecode, bucket
from dsf_runtime.runner import ModelRunner


@given(n=st.integers(1, 5000), extra=st.integers(0, 5000), floor=st.integers(1, 300))
def test_bucket_is_the_least_power_of_two_that_fits(n, extra, floor):
    limit = n + extra
    b = bucket(n, limit, floor)
    assert max(n, 1) <= b <= limit
    if b < limit:  # not capped: a power of two, and half of it would not fit
        assert b & (b - 1) == 0 and b >= floor and b // 2 < max(n, floor)


def _rerun(fn):
    """A stand-in for a CUDA graph: replaying reruns the recorded step on the static
    buffers as they are then and writes into the recorded output."""
    out = fn()

    def replay():
        out.copy_(fn())

    return replay, out


def _attach(runner: ModelRunner, record=_rerun) -> GraphedDecode:
    runner.graphs = GraphedDecode(runner.step, runner.slots, runner.max_len, runner.device, record=record)
    return runner.graphs


def _script(runner: ModelRunner) -> list[torch.Tensor]:
    """Prefill three slots, decode them together (batch 3 pads to 4), past the first span
    bucket, then move the last into slot 0 and decode it alone."""
    prompts = [list(range(3, 20)), [7], list(range(100, 160))]  # 17, 1 and 60 tokens
    for slot, ids in enumerate(prompts):
        runner.prefill(slot, ids)
    out = []
    lengths = [len(p) for p in prompts]
    for step in range(8):  # slot 2 crosses position 64: a second span bucket
        out.append(runner.decode([5 + step] * 3, lengths))
        lengths = [n + 1 for n in lengths]
    runner.move(2, 0, lengths[2])
    out.append(runner.decode([9], [lengths[2]]))
    out.append(runner.decode([10], [lengths[2] + 1]))
    return out


def test_replayed_steps_equal_eager_decode():
    model = make_tiny_llama(300)
    eager = _script(ModelRunner(model, slots=4, max_len=160))
    runner = ModelRunner(model, slots=4, max_len=160)
    graphs = _attach(runner)
    replayed = _script(runner)
    assert graphs.failed is None
    # batch 3 -> bucket 4; spans 61..68 -> 64 and 128; batch 1 -> 1 at span 128
    assert set(graphs.graphs) == {(4, MIN_SPAN), (4, 128), (1, 128)}
    for a, b in zip(replayed, eager):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_returned_logits_are_not_overwritten_by_the_next_step():
    model = make_tiny_llama(300)
    runner = ModelRunner(model, slots=1, max_len=64)
    _attach(runner)
    runner.prefill(0, [3, 4, 5])
    first = runner.decode([6], [3])
    kept = first.clone()
    runner.decode([7], [4])  # recorded at the first call: this one replays
    runner.decode([8], [5])
    torch.testing.assert_close(first, kept, rtol=0, atol=0)


def test_a_failed_recording_falls_back_to_eager_steps(caplog):
    model = make_tiny_llama(300)
    eager = _script(ModelRunner(model, slots=4, max_len=160))
    runner = ModelRunner(model, slots=4, max_len=160)
    calls = []

    def refuse(fn):
        calls.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs = _attach(runner, record=refuse)
    with caplog.at_level(logging.WARNING, logger="dsf_runtime.cuda_graphs"):
        replayed = _script(runner)
    assert "not permitted" in graphs.failed and not graphs.graphs
    assert len(calls) == 1  # tried once, then eager for good
    assert "without CUDA graphs" in caplog.text
    for a, b in zip(replayed, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_graphs_are_only_for_cuda_models_and_can_be_turned_off(monkeypatch):
    model = make_tiny_llama(300)
    assert ModelRunner(model, slots=1, cuda_graphs=True).graphs is None  # a CPU model
    monkeypatch.setenv("DSF_CUDA_GRAPHS", "sometimes")
    from dsf_runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="DSF_CUDA_GRAPHS"):
        ModelRunner(model, slots=1)
