"""The engine: continuous batching gives each request exactly what it would get alone."""

from __future__ import annotations

import queue
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import make_tiny_llama
from dsf_runtime.generate import generate_text
from dsf_runtime.serve.engine import (
    ContextLengthError,
    Engine,
    EngineDeadError,
    InvalidPromptError,
    QueueFullError,
    collect,
)
from dsf_runtime.serve.metrics import ServerMetrics
from dsf_runtime.serve.sampling import SamplingParams
from tests_support import fail_on_call

PROMPTS = [
    "Elizabeth was",
    "It is a truth universally acknowledged",
    "Mr. Darcy",
    "The sisters walked",
    "Anne",
    "Captain Wentworth had",
    "Emma",
    "Her mother",
]


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(384)


@pytest.fixture
def engine(model, tiny_tokenizer):
    eng = Engine(
        model, tiny_tokenizer, max_concurrency=3, max_queue=16, max_model_len=128, metrics=ServerMetrics("tiny")
    ).start()
    yield eng
    eng.shutdown()


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


def _ids(tok, prompt: str) -> list[int]:
    return tok(prompt)["input_ids"]


def wait_idle(engine: Engine, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while engine.load() != (0, 0):
        assert time.monotonic() < end, f"engine still busy: {engine.load()}"
        time.sleep(0.01)


def test_concurrent_greedy_equals_generate_alone(engine, model, tiny_tokenizer):
    """8 requests on 3 slots with different lengths: requests queue, join between steps,
    leave at different times (slots get compacted), and each matches transformers' generate."""
    lengths = [3, 17, 9, 25, 1, 12, 30, 6]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(
            pool.map(lambda p, n: engine.generate(_ids(tiny_tokenizer, p), greedy(n), timeout=60), PROMPTS, lengths)
        )
    for prompt, n, result in zip(PROMPTS, lengths, results):
        alone = generate_text(model, tiny_tokenizer, prompt, n, fixed_length=True)
        assert result.text == alone.text, prompt
        assert result.finish_reason == "length" and result.completion_tokens == n
        assert result.prompt_tokens == len(_ids(tiny_tokenizer, prompt))
    wait_idle(engine)


def test_seed_makes_sampling_reproducible(engine, tiny_tokenizer):
    ids = _ids(tiny_tokenizer, "Anne")
    params = dict(max_tokens=20, temperature=1.0, top_p=0.95, top_k=100, repetition_penalty=1.1, ignore_eos=True)
    a = engine.generate(ids, SamplingParams(seed=1, **params), timeout=60)
    b = engine.generate(ids, SamplingParams(seed=1, **params), timeout=60)
    c = engine.generate(ids, SamplingParams(seed=2, **params), timeout=60)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_stop_string_and_stop_token(engine, tiny_tokenizer):
    ids = _ids(tiny_tokenizer, "It is a truth")
    full = engine.generate(ids, greedy(30), timeout=60)
    stop = full.text[10:13]
    cut = engine.generate(ids, greedy(30, stop=(stop,)), timeout=60)
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    token = full.token_ids[6]
    first = full.token_ids.index(token)
    by_id = engine.generate(ids, greedy(30, stop_token_ids=(token,)), timeout=60)
    assert by_id.finish_reason == "stop" and by_id.token_ids == full.token_ids[: first + 1]


def test_eos_ends_unless_ignored(engine, tiny_tokenizer):
    ids = _ids(tiny_tokenizer, "Emma")
    full = engine.generate(ids, greedy(20), timeout=60)
    eos = full.token_ids[4]
    saved = engine.eos_ids
    engine.eos_ids = {eos}
    try:
        ended = engine.generate(ids, SamplingParams(max_tokens=20, temperature=0), timeout=60)
        kept = engine.generate(ids, greedy(20), timeout=60)
    finally:
        engine.eos_ids = saved
    assert ended.finish_reason == "stop" and ended.token_ids == full.token_ids[: full.token_ids.index(eos) + 1]
    assert kept.token_ids == full.token_ids and kept.finish_reason == "length"


def test_logprobs_are_the_models(engine, model, tiny_tokenizer):
    ids = _ids(tiny_tokenizer, "Her mother")
    out = engine.generate(ids, greedy(3, logprobs=3), timeout=60)
    with torch.no_grad():
        first = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], -1)
    assert len(out.logprobs) == 3
    assert out.logprobs[0].token == int(first.argmax())
    assert abs(out.logprobs[0].logprob - float(first.max())) < 1e-4
    assert [t for t, _ in out.logprobs[0].top][0] == out.logprobs[0].token


def test_cancel_frees_the_slot(engine, tiny_tokenizer):
    outputs: queue.Queue = queue.Queue()
    request = engine.submit(_ids(tiny_tokenizer, "Anne"), greedy(120), outputs.put)
    outputs.get(timeout=30)  # it is running
    engine.cancel(request)
    last = outputs.get(timeout=30)
    while not last.finished:
        last = outputs.get(timeout=30)
    assert last.finish_reason == "abort" and last.completion_tokens < 120
    wait_idle(engine)
    again = engine.generate(_ids(tiny_tokenizer, "Anne"), greedy(4), timeout=60)
    assert again.completion_tokens == 4


def test_queue_bound_and_prompt_checks(model, tiny_tokenizer):
    eng = Engine(model, tiny_tokenizer, max_concurrency=1, max_queue=1, max_model_len=64)  # not started
    ids = _ids(tiny_tokenizer, "Anne")
    sink = lambda out: None  # noqa: E731
    eng.submit(ids, greedy(4), sink)  # takes the free slot
    eng.submit(ids, greedy(4), sink)  # waits
    with pytest.raises(QueueFullError, match="busy"):
        eng.submit(ids, greedy(4), sink)
    with pytest.raises(ContextLengthError, match=r"maximum context length is 64 tokens.*" + str(len(ids) + 70)):
        eng.submit(ids, greedy(70), sink)
    with pytest.raises(InvalidPromptError, match="empty"):
        eng.submit([], greedy(4), sink)
    with pytest.raises(InvalidPromptError, match="outside the vocabulary"):
        eng.submit([5, 100000], greedy(4), sink)


def test_failed_steps_restart_the_engine_until_the_budget_is_spent(model, tiny_tokenizer, monkeypatch):
    metrics = ServerMetrics("tiny")
    eng = Engine(model, tiny_tokenizer, max_concurrency=2, max_model_len=64, metrics=metrics, max_restarts=2).start()

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(eng.runner, "decode", broken)
    for _ in range(2):  # two restarts are allowed: each failure ends only the requests in the step
        result = eng.generate(_ids(tiny_tokenizer, "Anne"), greedy(5), timeout=30)
        assert result.finish_reason == "error" and "kernel exploded" in result.error
        assert eng.alive
    result = eng.generate(_ids(tiny_tokenizer, "Anne"), greedy(5), timeout=30)  # the third within the window
    assert result.finish_reason == "error"
    eng._thread.join(5)
    assert not eng.alive and len(eng.restarts) == 2
    assert b'dsf_engine_restarts_total{model_name="tiny"} 2.0' in metrics.render()
    with pytest.raises(EngineDeadError, match="kernel exploded"):
        eng.submit(_ids(tiny_tokenizer, "Anne"), greedy(5), lambda out: None)


def test_waiting_requests_survive_a_restart(model, tiny_tokenizer, monkeypatch):
    eng = Engine(model, tiny_tokenizer, max_concurrency=1, max_model_len=64).start()
    real = eng.runner.decode
    monkeypatch.setattr(eng.runner, "decode", fail_on_call(real, 2, RuntimeError("transient")))
    try:
        first, second = queue.Queue(), queue.Queue()
        eng.submit(_ids(tiny_tokenizer, "Anne"), greedy(6), first.put)
        eng.submit(_ids(tiny_tokenizer, "Emma"), greedy(6), second.put)  # waits for the only slot
        ended = collect(iter(lambda: first.get(timeout=30), None))
        served = collect(iter(lambda: second.get(timeout=30), None))
        assert ended.finish_reason == "error" and "transient" in ended.error
        monkeypatch.setattr(eng.runner, "decode", real)
        alone = eng.generate(_ids(tiny_tokenizer, "Emma"), greedy(6), timeout=30)
        assert served.finish_reason == "length" and served.token_ids == alone.token_ids
    finally:
        eng.shutdown()


def test_a_request_with_non_finite_logits_fails_alone(model, tiny_tokenizer, monkeypatch):
    """NaN logits for one request (as a broken model would give) end that request only; the
    others in the same batched steps get what they get alone, and its slot's cache is cleared."""
    eng = Engine(model, tiny_tokenizer, max_concurrency=3, max_model_len=64).start()
    poison = _ids(tiny_tokenizer, "Mr. Darcy")
    real = eng.runner.decode

    def poisoned(tokens, positions):
        logits = real(tokens, positions).clone()  # inference tensors are read-only
        for i, r in enumerate(list(eng._running)[: len(tokens)]):
            if r.prompt_ids == poison and len(r.generated) >= 2:
                logits[i] = float("nan")
        return logits

    cleared = []
    real_clear = eng.runner.clear
    monkeypatch.setattr(eng.runner, "clear", lambda slot=None: (cleared.append(slot), real_clear(slot)))
    alone = {p: eng.generate(_ids(tiny_tokenizer, p), greedy(12), timeout=60).token_ids for p in PROMPTS[:2]}
    monkeypatch.setattr(eng.runner, "decode", poisoned)
    try:
        with ThreadPoolExecutor(3) as pool:
            jobs = [
                pool.submit(eng.generate, ids, params, 60)
                for ids, params in (
                    (_ids(tiny_tokenizer, PROMPTS[0]), greedy(12)),
                    (poison, greedy(12)),
                    (
                        _ids(tiny_tokenizer, PROMPTS[1]),
                        SamplingParams(max_tokens=12, temperature=0.7, top_p=0.9, ignore_eos=True, seed=3),
                    ),
                )
            ]
            good, bad, sampled = (j.result() for j in jobs)
        assert bad.finish_reason == "error" and "non-finite" in bad.error and bad.completion_tokens == 2
        assert good.token_ids == alone[PROMPTS[0]] and sampled.completion_tokens == 12
        assert cleared and eng.alive and not eng.restarts
    finally:
        eng.shutdown()


def test_a_failed_prefill_fails_only_its_request(model, tiny_tokenizer, monkeypatch):
    eng = Engine(model, tiny_tokenizer, max_concurrency=2, max_model_len=64).start()
    real = eng.runner.prefill
    bad_ids = _ids(tiny_tokenizer, "Emma")

    def prefill(slot, ids):
        if ids == bad_ids:
            raise MemoryError("cannot allocate this prompt")
        return real(slot, ids)

    monkeypatch.setattr(eng.runner, "prefill", prefill)
    try:
        failed = eng.generate(bad_ids, greedy(4), timeout=30)
        assert failed.finish_reason == "error" and "cannot allocate" in failed.error
        ok = eng.generate(_ids(tiny_tokenizer, "Anne"), greedy(4), timeout=30)
        assert ok.finish_reason == "length" and eng.alive and not eng.restarts
        wait_idle(eng)
    finally:
        eng.shutdown()


def test_serves_a_dsf_checkpoint(tiny_model_dir, tiny_tokenizer, tmp_path):
    from dsf_runtime.checkpoint import load_model
    from dsf_runtime.cli import main
    from dsf_runtime.patch import dsf_modules

    out = tmp_path / "ckpt"
    assert (
        main(["compress", str(tiny_model_dir), str(out), "--sparsity", "0.5", "--nsamples", "4", "--seqlen", "32"]) == 0
    )
    sparse, tok = load_model(out)
    assert dsf_modules(sparse)
    eng = Engine(sparse, tok, max_concurrency=4, max_model_len=128).start()
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda p: eng.generate(_ids(tok, p), greedy(10), timeout=60), PROMPTS[:4]))
        for prompt, result in zip(PROMPTS[:4], results):
            assert result.text == generate_text(sparse, tok, prompt, 10, fixed_length=True).text
    finally:
        eng.shutdown()


def test_loader_runs_a_dense_model_in_bfloat16(tiny_model_dir):
    """dsf serve --dtype bfloat16: the loader builds the engine on a bf16 model (KV cache in
    bf16 too), and its greedy output is that of the same model run by generate_text."""
    from dsf_runtime.models import load_dense
    from dsf_runtime.serve.server import make_loader

    eng = make_loader(str(tiny_model_dir), dtype=torch.bfloat16, max_concurrency=2, max_model_len=64)(
        ServerMetrics("tiny")
    )
    try:
        assert eng.runner.dtype == torch.bfloat16 and eng.runner.k_cache.dtype == torch.bfloat16
        eng.start()
        model, tok = load_dense(tiny_model_dir, dtype=torch.bfloat16)
        result = eng.generate(_ids(tok, PROMPTS[0]), greedy(8), timeout=60)
        assert result.text == generate_text(model, tok, PROMPTS[0], 8, fixed_length=True).text
    finally:
        eng.shutdown()
