"""scripts/path_crossover.py, the developers' word-vs-nonzero-path timing behind
NZ_MIN_BATCH: it times both paths per batch and refuses bad arguments."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsf_runtime.kernels import BACKENDS

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    not BACKENDS["cpu-bitmap"].available() or BACKENDS["cpu-bitmap"].isa == "portable",
    reason="needs the cpu-bitmap kernel's vector paths",
)


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSF_NZ_", "DSF_COLUMNS_"))}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "path_crossover.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_times_both_paths_for_each_batch():
    proc = _run("96x200", "2,17", "--seconds", "0.3", "--rotate-mib", "1")
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if " batch " in ln]
    assert [ln.split(":")[0] for ln in lines] == ["96x200 batch 2", "96x200 batch 17"]
    for ln in lines:
        fields = ln.split()
        word, nz, ratio = float(fields[4]), float(fields[7]), float(fields[10])
        assert word > 0 and nz > 0 and abs(ratio - nz / word) < 0.05 * ratio


@pytest.mark.skipif(BACKENDS["cpu-bitmap"].isa != "avx2", reason="the column-index path is AVX2's")
def test_times_the_column_path_for_each_density_and_batch():
    proc = _run("96x200", "1,3", "--columns", "0.1,0.3", "--values", "bf16", "--seconds", "0.3", "--rotate-mib", "1")
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if " batch " in ln]
    assert [ln.split()[4] for ln in lines] == ["1:", "3:", "1:", "3:"]
    for ln, density in zip(lines, (0.1, 0.1, 0.3, 0.3)):
        fields = ln.split()
        assert abs(float(fields[2]) - density) < 0.03  # the factor's measured density
        word, cols, ratio = float(fields[6]), float(fields[9]), float(fields[12])
        assert word > 0 and cols > 0 and abs(ratio - cols / word) < 0.05 * ratio


@pytest.mark.parametrize(
    "args",
    [
        ["96by200", "2"],
        ["96x200", "two"],
        ["96x200", "0"],
        ["96x200", "1", "--columns", "0"],
        ["96x200", "1", "--columns", "x"],
    ],
)
def test_bad_arguments_are_refused(args):
    proc = _run(*args)
    assert proc.returncode == 2 and "error:" in proc.stderr
