"""scripts/gpu_check.sh, the one-shot run for a lent GPU, rehearsed here in its dry-run
mode: every step runs (tests, then each benchmark part on the CPU in Triton's
interpreter) and writes its files, so a GPU's few minutes are not lost to a broken script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("triton", reason="the dry run needs Triton's interpreter (pip install triton)")


def test_dry_run_runs_every_step(tmp_path):
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "PYTEST_FILES": "tests/benchmarks/test_gpu.py",
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    log = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 0, proc.stderr[-2000:]
    for step in ("environment", "install", "pytest: CUDA tests", "layer", "tune", "decode", "convert", "done"):
        assert f"=== {step}" in log or f"=== dsf bench gpu: {step}" in log, step
    codes = [line for line in log.splitlines() if line.startswith("rc=")]
    assert codes == ["rc=0"] * 5, codes  # pytest and the four benchmark parts
    for name in ("gpu_layer", "gpu_tune", "gpu_decode", "gpu_convert"):
        payload = json.loads((tmp_path / "gpu" / f"{name}.json").read_text())
        assert payload["dry_run"] is True and "dry run" in payload["environment"]["cuda"]
    layer = json.loads((tmp_path / "gpu" / "gpu_layer.json").read_text())["rows"]
    dsf = [r for r in layer if r["impl"].startswith("DSF")]
    assert dsf and all("error" not in r and r["rel_err"] < 2e-2 for r in dsf)  # the kernel ran and was right
    decode = json.loads((tmp_path / "gpu" / "gpu_decode.json").read_text())["rows"]
    assert all("error" not in r and r["tg_tok_s"] > 0 for r in decode)
