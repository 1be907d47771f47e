"""scripts/kernel_ab.py, the developers' in-process A/B of two kernel source directories:
both build as op libraries side by side, each path runs, and the equal-results check
catches a version that computes another y (on the path that version changed only)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsf_runtime.kernels import BACKENDS, cpu_bitmap

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "dsf_runtime" / "kernels" / "csrc"
pytestmark = pytest.mark.skipif(
    cpu_bitmap.find_compiler() is None or BACKENDS["cpu-bitmap"].isa == "portable",
    reason="needs a C++ compiler and a CPU with the AVX2 paths",
)
# One line per path's result, each scaled in the "wrong" version: the AVX2 word path,
# the column-index path, the AVX-512 256-bit variants.
EDITS = {
    "avx2.cpp": [
        (
            "    y[b * ldy] = KIND == kInt8 ? scale * kInt8Unit * hsum256(sum) : hsum256(sum);",
            "    y[b * ldy] = KIND == kInt8 ? scale * kInt8Unit * hsum256(sum) : 1.5f * hsum256(sum);",
        ),
        ("      y[b * ldy + r] = scale * s;", "      y[b * ldy + r] = 0.5f * scale * s;"),
    ],
    "avx512_bf16.cpp": [("    y[b * ldy] = hsum256(sum);", "    y[b * ldy] = 0.5f * hsum256(sum);")],
}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "kernel_ab.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def wrong(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ab") / "wrong"
    shutil.copytree(SOURCE, out)
    for name, edits in EDITS.items():
        text = (out / name).read_text()
        for old, new in edits:
            assert text.count(old) == 1, old
            text = text.replace(old, new)
        (out / name).write_text(text)
    return out


def _ab(old: Path, new: Path, *args: str) -> subprocess.CompletedProcess:
    return _run(old, new, "--shape", "64x96", "--seconds", "0.3", "--rotate-mib", "1", *args)


# Every run pairs SOURCE (built as dsf_ab0) with ``wrong`` (dsf_ab1): two builds for the
# whole module, each cached after its first use.


def test_times_both_versions_on_each_path(wrong):
    for path, batch in (("word", "3"), ("nz", "17"), ("cols", "2")):
        proc = _ab(SOURCE, wrong, "--batch", batch, "--path", path, "--no-check")
        assert proc.returncode == 0, proc.stderr
        last = proc.stdout.strip().splitlines()[-1]
        assert last.startswith("old ") and "new/old" in last and "calls each" in last


def test_a_version_with_another_result_is_refused_on_that_path_only(wrong):
    for path in ("word", "cols"):
        proc = _ab(SOURCE, wrong, "--path", path)
        assert proc.returncode != 0 and "Mismatched elements" in proc.stderr, (path, proc.stderr)
    same = _ab(SOURCE, wrong, "--path", "nz", "--batch", "17")
    assert same.returncode == 0, same.stderr  # the nonzero path's code is unchanged
    bad = _run(SOURCE, wrong, "--shape", "64by96")
    assert bad.returncode == 2 and "--shape takes OUTxIN" in bad.stderr
    notdir = _run(SOURCE, SOURCE / "ops.cpp")
    assert notdir.returncode == 2 and "not a kernel source directory" in notdir.stderr


def test_new_kind_times_other_values_and_checks_them(wrong):
    """--new-kind runs the new version on the same factors stored in other values; the
    check allows their rounding but still refuses a version that computes another y."""
    proc = _ab(SOURCE, wrong, "--path", "nz", "--batch", "17", "--kind", "fp16", "--new-kind", "bf16")
    assert proc.returncode == 0, proc.stderr
    assert "batch 17 fp16/bf16:" in proc.stdout and "new/old" in proc.stdout
    proc = _ab(SOURCE, wrong, "--kind", "int8", "--new-kind", "bf16")
    assert proc.returncode != 0 and "differ by" in proc.stderr and "int8 vs bf16" in proc.stderr


def test_avx512_word_paths_check_their_own_kernel(wrong):
    """--path word512 / word256 run the AVX-512 word path's two forms: the wrong 256-bit
    variant is refused, the unchanged 512-bit form passes; word256 takes bf16 only."""
    if not (cpu_bitmap.has_path("avx512-vbmi2") and cpu_bitmap.has_path("avx512-bf16")):
        pytest.skip("needs AVX-512 VBMI2 and AVX512_BF16")
    for path, refused in (("word256", True), ("word512", False)):
        proc = _ab(SOURCE, wrong, "--path", path, "--kind", "bf16", "--batch", "2")
        assert (proc.returncode != 0 and "Mismatched elements" in proc.stderr) == refused, proc.stderr
    bad = _run(SOURCE, wrong, "--path", "word256", "--kind", "fp16")
    assert bad.returncode == 2 and "bf16 values only" in bad.stderr
