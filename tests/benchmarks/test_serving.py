"""The serving benchmark runs end to end on a tiny checkpoint and reports what it measured."""

from __future__ import annotations

import json

import pytest

from dsf_runtime.benchmarks.serving import ENGINES, compare_engines, run_serving_bench
from tests_support import save_tiny


@pytest.fixture(scope="module")
def checkpoint(tiny_tokenizer, tmp_path_factory):
    from dsf_runtime.cli import main

    root = tmp_path_factory.mktemp("servbench")
    dense = save_tiny(root / "dense", tiny_tokenizer, max_position_embeddings=1024)
    out = root / "tiny-dsf"
    assert main(["compress", str(dense), str(out), "--sparsity", "0.5", "--nsamples", "4", "--seqlen", "32"]) == 0
    return out


def test_serving_bench_against_dsf_serve(checkpoint, tmp_path):
    servers = [("tiny", str(checkpoint), []), ("tiny bf16", str(checkpoint), ["--dtype", "bfloat16"])]
    payload = run_serving_bench(servers, [], tmp_path, streams=(1, 3), rounds=2, max_tokens=5)
    rows = payload["servers"]
    assert [(r["server"], r["streams"], r["requests"]) for r in rows] == [
        ("tiny", 1, 2),
        ("tiny", 3, 6),
        ("tiny bf16", 1, 2),
        ("tiny bf16", 3, 6),
    ]
    for r in rows:
        assert r["complete"] and r["output_tokens"] == 5 * r["requests"] and r["tok_s"] > 0
        assert 0 < r["ttft_mean_s"] <= r["ttft_p90_s"]
    assert payload["backends"]["tiny"] != "?"  # the backend dsf serve really used
    saved = json.loads((tmp_path / "serving.json").read_text())
    assert saved["servers"] == rows and (tmp_path / "serving.md").is_file()


def test_engine_comparison_covers_every_engine(checkpoint):
    from dsf_runtime.checkpoint import load_any

    model, tokenizer = load_any(checkpoint)
    rows = compare_engines(model, tokenizer, streams=(1, 2), max_tokens=3)
    assert {r["engine"] for r in rows} == set(ENGINES)
    ours = [r for r in rows if r["engine"].startswith("dsf engine")]
    assert all(r["tokens"] == 3 * r["streams"] for r in ours)


def test_dense_is_served_in_fp32_and_bf16():
    from dsf_runtime.benchmarks.serving import dsf_servers

    assert dsf_servers("out/ck", "smollm2-135m") == [
        ("dsf serve, DSF ck", "out/ck", [], "dsf"),
        ("dsf serve, dense smollm2-135m fp32", "smollm2-135m", ["--dtype", "float32"], "dsf"),
        ("dsf serve, dense smollm2-135m bf16", "smollm2-135m", ["--dtype", "bfloat16"], "dsf"),
    ]
    assert [s[0] for s in dsf_servers(None, "m")] == ["dsf serve, dense m fp32", "dsf serve, dense m bf16"]


def test_vllm_serves_the_dsf_checkpoint_and_the_dense_model_in_bf16(tiny_model_dir, tmp_path):
    from dsf_runtime.benchmarks.serving import ServerProcess, dense_model_dir, vllm_servers

    assert vllm_servers("out/ck", "out/dense") == [
        ("vllm serve, DSF ck", "out/ck", ["--dtype", "float32"], "vllm"),
        ("vllm serve, dense dense bf16", "out/dense", ["--dtype", "bfloat16"], "vllm"),
    ]
    assert dense_model_dir(str(tiny_model_dir), tmp_path) == str(tiny_model_dir)  # a directory is used as it is
    with pytest.raises(RuntimeError, match="no-such-vllm not found.*vllm_env.sh"):
        ServerProcess("out/ck", engine="vllm", vllm_bin="no-such-vllm")


def test_stack_servers_write_a_dense_model_and_a_dsf_checkpoint(tiny_tokenizer, tmp_path, monkeypatch):
    """--model llama7b-stack: the same random layers as a dense directory and a DSF checkpoint
    (here with tiny shapes), both loadable, written once and then reused."""
    from conftest import make_tiny_llama
    from dsf_runtime.benchmarks import decode, serving
    from dsf_runtime.checkpoint import load_model
    from dsf_runtime.models import load_dense
    from dsf_runtime.patch import dsf_modules

    built = []
    monkeypatch.setattr(decode, "llama7b_stack", lambda n, vocab: built.append(n) or make_tiny_llama(vocab))
    monkeypatch.setattr(
        decode, "write_llama7b_stack", lambda *a, f=decode.write_llama7b_stack, **k: f(*a, tokenizer=tiny_tokenizer)
    )
    servers = serving.stack_servers(tmp_path / "stack", num_layers=2)
    assert [s[0] for s in servers] == [
        "dsf serve, DSF llama7b-stack x2",
        "dsf serve, DSF llama7b-stack x2 bf16",
        "dsf serve, dense llama7b-stack x2 fp32",
        "dsf serve, dense llama7b-stack x2 bf16",
    ]
    dense, _ = load_dense(servers[2][1])
    sparse, _ = load_model(servers[0][1])
    assert len(dsf_modules(sparse)) == 7 * dense.config.num_hidden_layers and not dsf_modules(dense)
    assert serving.stack_servers(tmp_path / "stack", num_layers=2) == servers and built == [2]  # reused
