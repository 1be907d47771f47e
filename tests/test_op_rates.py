"""scripts/op_rates.c, the developers' probe of the AVX2 loop's instruction issue rates:
it builds with the kernel's compiler and prints a cycle count for every test."""

from __future__ import annotations

import platform
import re
import subprocess
from pathlib import Path

import pytest

from dsf_runtime.kernels import BACKENDS
from dsf_runtime.kernels.cpu_bitmap import find_compiler

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(find_compiler() is None or platform.machine() not in ("x86_64", "AMD64"),
                                reason="needs a C compiler on x86-64")


def test_builds_and_reports_cycles(tmp_path):
    exe = tmp_path / "op_rates"
    build = subprocess.run([find_compiler(), "-x", "c", "-O2", "-mavx2", "-mfma", "-mf16c", "-mbmi2", "-mpopcnt",
                            str(ROOT / "scripts" / "op_rates.c"), "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    bad = subprocess.run([str(exe), "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "usage" in bad.stderr
    if BACKENDS["cpu-bitmap"].isa == "portable":  # the kernel's own check: no AVX2 + FMA + F16C + BMI2 here
        pytest.skip("this CPU cannot run the AVX2 instructions the probe times")
    run = subprocess.run([str(exe), "20000"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = re.findall(r"^(.+?)\s+([0-9.]+) cycles per iteration \(clock ([0-9.]+) GHz\)$", run.stdout, re.M)
    assert len(rows) == 9, run.stdout
    assert all(float(c) > 0 and float(ghz) > 0 for _, c, ghz in rows)
    assert rows[0][0].strip() == "8 x vcvtph2ps ymm"
