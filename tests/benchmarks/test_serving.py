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
    payload = run_serving_bench([("tiny", str(checkpoint))], [], tmp_path, streams=(1, 3), rounds=2, max_tokens=5)
    rows = payload["servers"]
    assert [(r["server"], r["streams"], r["requests"]) for r in rows] == [("tiny", 1, 2), ("tiny", 3, 6)]
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
