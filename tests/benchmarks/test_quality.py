"""Perplexity with strided windows against a direct computation."""

from __future__ import annotations

import math

import pytest
import torch

from dsf_runtime.evaluate import perplexity


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
    assert perplexity(model, ids, window=64, stride=64, progress=False) == pytest.approx(
        direct_perplexity(model, ids), rel=1e-5
    )


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


def test_quality_bench_writes_json_markdown_png(tiny_model_dir, tmp_path):
    import json

    from dsf_runtime.cli import main

    out = tmp_path / "results"
    code = main(
        [
            "bench",
            "quality",
            str(tiny_model_dir),
            "--methods",
            "dsf,magnitude",
            "--sparsity",
            "0.5,0.7",
            "--nsamples",
            "4",
            "--seqlen",
            "32",
            "--eval-tokens",
            "300",
            "--out",
            str(out),
            "--work-dir",
            str(tmp_path / "work"),
        ]
    )
    assert code == 0
    payload = json.loads((out / "quality.json").read_text())
    rows = payload["rows"]
    assert [r["method"] for r in rows] == ["dense", "dsf", "magnitude", "dsf", "magnitude"]
    assert all(r["perplexity"] > 1 for r in rows)
    assert all(abs(r["density"] - (1 - r["sparsity"])) < 0.02 for r in rows[1:])
    assert (out / "quality.png").stat().st_size > 1000
    assert "| dsf |" in (out / "quality.md").read_text()
    # A second run reuses the checkpoints instead of recompressing.
    assert (
        main(
            [
                "bench",
                "quality",
                str(tiny_model_dir),
                "--methods",
                "dsf",
                "--sparsity",
                "0.5",
                "--nsamples",
                "4",
                "--seqlen",
                "32",
                "--eval-tokens",
                "300",
                "--out",
                str(out),
                "--work-dir",
                str(tmp_path / "work"),
            ]
        )
        == 0
    )


def test_quality_bench_rejects_unknown_method_before_work(tmp_path, capsys):
    from dsf_runtime.cli import main

    assert main(["bench", "quality", str(tmp_path), "--methods", "dsf,obs"]) == 2
    assert "unknown method" in capsys.readouterr().err
