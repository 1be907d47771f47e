"""Storage benchmark: bytes per format, and the load measurement in fresh processes."""

from __future__ import annotations

import json

import pytest

from dsf_runtime.benchmarks import storage
from dsf_runtime.converters.factorize import split_budget


def test_random_pairs_have_dsf_budget():
    L, R = storage.random_dsf_pair(96, 40, 0.5)
    b = split_budget(96, 40, 0.5)
    assert int((L != 0).sum()) == b.other and int((R != 0).sum()) == b.square
    assert L.shape == (96, 40) and R.shape == (40, 40)


def test_compact_format_meets_byte_target_on_llama_shapes(monkeypatch):
    """Same densities as LLaMA-7B at 1/8 of the size: bitmap <= 0.63x dense bf16."""
    monkeypatch.setattr(storage, "LLAMA7B_LAYER", {k: (o // 8, i // 8) for k, (o, i) in storage.LLAMA7B_LAYER.items()})
    sizes, dense = storage.llama7b_layer_bytes(0.5)
    assert sizes["bitmap"] / dense <= 0.63
    assert sizes["csr"] / dense == pytest.approx(1.0, abs=0.02)  # int16 index + fp16 value per nonzero
    assert sizes["bsr"] > sizes["csr"]  # unstructured masks fill blocks poorly


def test_storage_bench_with_load_measurement(tiny_model_dir, tmp_path, monkeypatch):
    from dsf_runtime.converters.pipeline import make_job, run_compress

    monkeypatch.setattr(storage, "LLAMA7B_LAYER", {"q_proj": (64, 64), "down_proj": (32, 96)})
    ckpt, _ = run_compress(make_job(str(tiny_model_dir), tmp_path / "ck", nsamples=4, seqlen=32, progress=False))
    payload = storage.run_storage_bench(str(ckpt), str(tiny_model_dir), str(tmp_path / "res"), load_repeats=1)
    data = json.loads((tmp_path / "res" / "storage.json").read_text())
    assert {r["format"] for r in data["bytes"]} == {"bitmap", "bsr", "csr", "bitmap+int8", "csr+int8"}
    by = {(r["subject"], r["format"]): r["vs_bf16"] for r in data["bytes"]}
    for subject in {r["subject"] for r in data["bytes"]}:
        assert by[(subject, "bitmap+int8")] < by[(subject, "bitmap")]  # one byte per value instead of two
    assert [r["model"] for r in data["load"]] == ["dense", "DSF"]
    for row in data["load"]:
        assert row["first_token_seconds"] >= row["load_seconds"] > 0
        assert len(row["runs"]) == 1
    from dsf_runtime.kernels import BACKENDS

    assert ("cpu-bitmap" if BACKENDS["cpu-bitmap"].available() else "torch-csr") in data["load"][1]["backend"]
    assert "disk to first token" in payload["table"]
