"""`dsf bench gpu`: a clear error without CUDA; with a GPU, a small real run."""

from __future__ import annotations

import json

import pytest
import torch

from dsf_runtime.cli import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_without_cuda_is_a_clear_error(capsys, tmp_path):
    assert main(["bench", "gpu", "--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_bad_parts_are_refused(capsys):
    assert main(["bench", "gpu", "--parts", "layer,warp"]) == 2
    assert "--parts" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_small_layer_run_on_cuda(tmp_path):
    assert main(
        ["bench", "gpu", "--parts", "layer", "--shapes", "96x160", "--batch", "1,9", "--out", str(tmp_path)]
    ) in (0, None)
    rows = json.loads((tmp_path / "gpu_layer.json").read_text())["rows"]
    dsf = [r for r in rows if r["impl"].startswith("DSF")]
    assert len(dsf) == 8 and all("error" not in r for r in dsf)
    assert all(r["rel_err"] < (2e-2 if "int8" in r["impl"] else 2e-3) for r in dsf)


def test_suggested_tuning_entry_takes_each_paths_fastest_setting():
    from dsf_runtime.benchmarks.gpu import suggested_entry

    def row(batch, path, us, block_r=64, pps=4, segment=False):
        return {
            "batch": batch,
            "path": path,
            "block_r": block_r,
            "wpi": 2,
            "num_warps": 4,
            "programs_per_sm": pps,
            "segment": segment,
            "us": us,
        }

    rows = [
        row(1, "vector", 50.0),
        row(1, "vector", 41.0, block_r=16, pps=1),
        row(1, "vector", 45.0, block_r=32),
        {"batch": 1, "path": "vector", "block_r": 8, "wpi": 2, "num_warps": 4, "programs_per_sm": 4, "error": "x"},
        row(16, "dot", 60.0),
        row(16, "dot", 58.0, block_r=128, segment=True),
        row(2, "vector", 40.0),
        row(2, "dot", 52.0),
        row(3, "vector", 60.0),
        row(3, "dot", 55.0),
        row(4, "vector", 90.0),
        row(4, "dot", 56.0),
    ]
    entry = suggested_entry(rows)
    assert entry["vector"] == {"block_r": 16, "wpi": 2, "num_warps": 4, "programs_per_sm": 1, "segment": False}
    assert entry["dot"]["block_r"] == 128 and entry["dot"]["segment"] is True
    assert entry["dot_min_batch"] == 3
    # the dot path never faster: it starts past the largest batch timed
    assert suggested_entry([row(2, "vector", 1.0), row(2, "dot", 2.0)])["dot_min_batch"] == 3


def test_a_time_limit_keeps_the_settings_timed_so_far(monkeypatch):
    """gpu_check.sh stops a part with SIGINT at its time limit: the rows timed before it are kept."""
    from dsf_runtime.benchmarks import gpu

    calls = []

    def tune_row(pl, pr, x, kw, shape):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(kw)
        return {"batch": x.shape[0], "us": 1.0}

    monkeypatch.setattr(gpu, "_tune_row", tune_row)
    rows = gpu.run_tune(96, 160, device="cpu")
    assert rows == [{"batch": 1, "us": 1.0}] * 2
