"""Layer benchmark plumbing on small shapes (numbers are measured, not asserted)."""

from __future__ import annotations

import json

import torch

from dsf_runtime.benchmarks import layer


def test_every_case_computes_the_same_product(monkeypatch):
    monkeypatch.setattr(layer, "ROTATE_BYTES", 1 << 16)
    cases = {c.name: c for c in layer.build_cases(48, 80)}
    assert {"dense fp32", "dense bf16", "DSF torch-csr", "DSF scipy-csr"} <= set(cases)
    x = torch.randn(3, 80)
    ref = cases["DSF torch-csr"].fn(0, x)
    for name in ("DSF scipy-csr", "DSF cpu-bitmap"):
        if name in cases:
            torch.testing.assert_close(cases[name].fn(cases[name].copies - 1, x).float(), ref, rtol=1e-4, atol=1e-4)
    assert all(c.copies >= 2 and c.weight_bytes > 0 for c in cases.values())
    if "DSF cpu-bitmap int8" in cases:  # int8 values: the product up to the rounding of the values
        y = cases["DSF cpu-bitmap int8"].fn(0, x)
        assert 0 < float((y - ref).norm() / ref.norm()) < 0.02
        assert cases["DSF cpu-bitmap int8"].weight_bytes < cases["DSF cpu-bitmap"].weight_bytes
    for name, bound in (("DSF cpu-bitmap fp16 values", 0.01), ("DSF cpu-bitmap bf16 model", 0.02)):
        if name in cases:  # fp16 rounding instead of the default bf16's; bf16 x and output: up to their rounding
            y = cases[name].fn(0, x)
            assert y.dtype == torch.float32
            assert 0 < float((y - ref).norm() / ref.norm()) < bound
            assert cases[name].weight_bytes == cases["DSF cpu-bitmap"].weight_bytes


def test_bench_writes_results(monkeypatch, tmp_path):
    monkeypatch.setattr(layer, "ROTATE_BYTES", 1 << 16)
    monkeypatch.setattr(layer, "memory_bandwidth", lambda: 10.0)
    monkeypatch.setattr(layer, "time_cases", lambda cases, x: [1e-3] * len(cases))
    payload = layer.run_layer_bench({"t 32x40": (32, 40)}, (1, 2), str(tmp_path), progress=False)
    data = json.loads((tmp_path / "layer.json").read_text())
    assert {r["batch"] for r in data["rows"]} == {1, 2}
    assert all(abs(r["speedup_vs_fp32"] - 1.0) < 1e-9 for r in data["rows"])
    assert (tmp_path / "layer.png").stat().st_size > 1000
    assert "memory bandwidth" in payload["table"] and "kernel path" in payload["table"]
    from dsf_runtime.kernels import BACKENDS

    if BACKENDS["cpu-bitmap"].available():  # every kernel row names its path per factor, R first
        paths = [r["path"] for r in data["rows"] if r["impl"].startswith("DSF cpu-bitmap")]
        assert paths and all(p.startswith("R: ") and "; L: " in p for p in paths)


def test_cases_take_turns_in_bursts():
    """Every case is timed as often as the others, in alternating bursts whose first call
    is not timed, cycling through its weight copies."""
    calls = []
    cases = [
        layer.Case(name, lambda i, x, n=name: calls.append((n, i)), 1, copies)
        for name, copies in (("a", 2), ("b", 3), ("c", 1))
    ]
    times = layer.time_cases(cases, torch.zeros(1), min_calls=5, min_seconds=0.0, burst=3)
    assert len(times) == 3 and all(t >= 0 for t in times)
    assert calls[:6] == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("b", 2), ("c", 0)]  # warm-up: each copy once
    timed = calls[6:]
    # 3 turns of 3-call bursts (2 timed each) reach 6 >= 5 timed calls per case
    assert [n for n, _ in timed] == list("aaabbbccccccbbbaaaaaabbbccc")
    assert [i for n, i in timed if n == "b"] == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    assert [i for n, i in timed if n == "a"] == [0, 1, 0, 1, 0, 1, 0, 1, 0]


def test_decode_bench_on_tiny_models(tiny_model_dir, tmp_path, monkeypatch):
    from dsf_runtime.benchmarks import decode
    from dsf_runtime.converters.pipeline import make_job, run_compress

    ckpt, _ = run_compress(make_job(str(tiny_model_dir), tmp_path / "ck", nsamples=4, seqlen=32, progress=False))
    from conftest import make_tiny_llama

    monkeypatch.setattr(decode, "llama7b_stack", lambda n: make_tiny_llama(300, num_hidden_layers=n))
    payload = decode.run_decode_bench(
        str(ckpt), str(tiny_model_dir), 1, str(tmp_path / "res"), gen_tokens=4, prompt_tokens=8
    )
    rows = json.loads((tmp_path / "res" / "decode.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == [
        "dense fp32",
        "dense bf16",
        "DSF",
        "DSF (torch-csr)",
        "dense fp32",
        "dense bf16",
        "DSF",
        "DSF fp16 values",
        "DSF bf16",
    ]
    assert all(r["tg_tok_s"] > 0 and r["pp_tok_s"] > 0 for r in rows)
    assert "cpu-bitmap" in rows[2]["backend"] and "torch-csr" in rows[3]["backend"]
    assert rows[-1]["tg_vs_bf16"] > 0 and "DSF bf16" in payload["table"]
    assert "tg4 tok/s" in payload["table"]


def test_decode_variants_take_turns(monkeypatch):
    from dsf_runtime.benchmarks import decode

    order = []
    monkeypatch.setattr(decode, "decode_once", lambda model, ids, n: (order.append(model.name), (0.5, 0.25))[1])

    class Fake:
        def __init__(self, name):
            self.name, self.config = name, type("C", (), {"vocab_size": 50})()

    res = decode.time_decodes([Fake("a"), Fake("b"), Fake("c")], prompt_tokens=4, gen_tokens=2, repeats=3)
    assert order == ["a", "b", "c", "c", "b", "a", "a", "b", "c", "c", "b", "a"]  # warm-up round, then 3 timed
    assert res == [{"pp_tok_s": 8.0, "tg_tok_s": 8.0}] * 3

    # an external reference (llama.cpp) takes its turn in the timed rounds, not the warm-up
    order.clear()
    speeds = iter([10.0, 30.0, 20.0])

    def external(ids):
        order.append("x")
        assert ids == decode.bench_prompt(50, 4)[0].tolist()
        return {"pp_tok_s": 1.0, "tg_tok_s": next(speeds)}

    res = decode.time_decodes([Fake("a"), Fake("b")], prompt_tokens=4, gen_tokens=2, repeats=3, external=external)
    assert order == ["a", "b", "x", "b", "a", "a", "b", "x", "x", "b", "a"]
    assert res[:2] == [{"pp_tok_s": 8.0, "tg_tok_s": 8.0}] * 2 and res[2] == {"pp_tok_s": 1.0, "tg_tok_s": 20.0}


def test_greedy_decode_loop_matches_generate(tiny_model_dir):
    """decode_once's KV-cache loop (written out here) is the same computation as generate."""
    from transformers import AutoModelForCausalLM

    from dsf_runtime.benchmarks.decode import _cache_kwarg

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    kw = _cache_kwarg(model)
    ids = torch.randint(3, 300, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        past, nxt, toks = out.past_key_values, out.logits[:, -1:].argmax(-1), []
        for _ in range(5):
            toks.append(int(nxt))
            out = model(input_ids=nxt, use_cache=True, **{kw: past})
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        ref = model.generate(
            ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(ids)
        )
    assert toks == ref[0, 8:].tolist()
