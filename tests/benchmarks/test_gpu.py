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
    assert len(dsf) == 6 and all("error" not in r for r in dsf)
    assert all(r["rel_err"] < (2e-2 if "int8" in r["impl"] else 2e-3) for r in dsf)
