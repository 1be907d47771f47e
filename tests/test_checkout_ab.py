"""scripts/checkout_ab.py, the developers' A/B of two checkouts: a smoke test on this
checkout against itself, and its argument errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dsf_runtime.kernels import BACKENDS

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "checkout_ab.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.skipif(not BACKENDS["cpu-bitmap"].available(), reason="needs the cpu-bitmap kernel")
def test_times_a_checkout_against_itself():
    proc = _run(ROOT, ROOT, "--shape", "64x96", "--batch", "1,3", "--rounds", "4", "--calls", "2", "--rotate-mib", "1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("shape 64x96; old isa ")
    for line, batch in zip(lines[1:], (1, 3)):
        assert re.fullmatch(
            rf"batch {batch}: old [\d.]+ ms, new [\d.]+ ms, new/old [\d.]+ \(quarters( [\d.]+){{4}}\)", line
        ), line


def test_refuses_bad_arguments(tmp_path):
    bad = _run(ROOT, ROOT, "--shape", "64by96")
    assert bad.returncode == 2 and "--shape takes OUTxIN" in bad.stderr
    missing = _run(ROOT, tmp_path)
    assert missing.returncode == 2 and "holds no dsf_runtime/ directory" in missing.stderr
