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
pytestmark = pytest.mark.skipif(
    find_compiler() is None or platform.machine() not in ("x86_64", "AMD64"), reason="needs a C compiler on x86-64"
)


@pytest.fixture(scope="module")
def op_rates(tmp_path_factory) -> Path:
    """The probe, built as its header says."""
    exe = tmp_path_factory.mktemp("op_rates") / "op_rates"
    build = subprocess.run(
        [
            find_compiler(),
            "-x",
            "c",
            "-O2",
            "-mavx2",
            "-mfma",
            "-mf16c",
            "-mbmi2",
            "-mpopcnt",
            str(ROOT / "scripts" / "op_rates.c"),
            "-o",
            str(exe),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    return exe


def test_builds_and_reports_cycles(op_rates):
    exe = op_rates
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


def test_the_avx512_table(op_rates):
    """`op_rates N avx512`: the AVX-512 word paths' instructions, or exit 3 where the CPU
    lacks them; any other mode is a usage error."""
    from dsf_runtime.kernels import cpu_bitmap

    exe = op_rates
    bad = subprocess.run([str(exe), "100", "avx1024"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "usage" in bad.stderr
    run = subprocess.run([str(exe), "20000", "avx512"], capture_output=True, text=True, timeout=120)
    cpu_bitmap.build()
    if not (cpu_bitmap.has_path("avx512-vbmi2") and cpu_bitmap.has_path("avx512-bf16")):
        assert run.returncode == 3 and "lacks" in run.stderr
        return
    assert run.returncode == 0, run.stderr
    rows = re.findall(r"^(.+?)\s+([0-9.]+) cycles per iteration \(clock ([0-9.]+) GHz\)$", run.stdout, re.M)
    assert [name.strip() for name, _, _ in rows] == [
        "4 x vpexpandw zmm",
        "4 x vpexpandw ymm",
        "4 x vpcompressw zmm",
        "4 x vpcompressw ymm",
        "4 x vcompressps zmm",
        "4 x (vcompressps zmm + vfmadd231ps zmm)",
        "4 x (vpexpandw zmm + vfmadd231ps zmm)",
        "4 x vpmovzxwd ymm -> zmm",
        "12 x vfmadd231ps zmm",
        "12 x vfmadd231ps ymm",
        "12 x vdpbf16ps zmm",
        "12 x vdpbf16ps ymm",
    ]
    assert all(float(c) > 0 and float(ghz) > 0 for _, c, ghz in rows)
