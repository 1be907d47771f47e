"""scripts/kernel_ab.py, the developers' in-process A/B of two kernel sources: it runs
both paths, and its equal-results check catches a version that computes another y."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dsf_runtime.kernels import BACKENDS
from dsf_runtime.kernels.cpu_bitmap import find_compiler

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "dsf_runtime" / "kernels" / "csrc" / "bitmap_spmm.cpp"
pytestmark = pytest.mark.skipif(
    find_compiler() is None or BACKENDS["cpu-bitmap"].isa == "portable",
    reason="needs a C++ compiler and a CPU with the AVX2 paths",
)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_ab.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_times_both_versions_on_both_paths(tmp_path):
    twin = tmp_path / "twin.cpp"
    twin.write_text(SOURCE.read_text())
    for path, batch in (("word", "3"), ("nz", "17"), ("cols", "2")):
        proc = _run(SOURCE, twin, "--shape", "96x200", "--batch", batch, "--path", path, "--seconds", "0.3",
                    "--rotate-mib", "1")
        assert proc.returncode == 0, proc.stderr
        last = proc.stdout.strip().splitlines()[-1]
        assert last.startswith("old ") and "new/old" in last and "calls each" in last


def test_a_version_with_another_result_is_refused(tmp_path):
    wrong = tmp_path / "wrong.cpp"
    text = SOURCE.read_text()
    line = "    y[b * ldy] = KIND == kInt8 ? scale * kInt8Unit * hsum256(sum) : hsum256(sum);"
    assert line in text
    wrong.write_text(text.replace(line, line.replace(": hsum256(sum);", ": 1.5f * hsum256(sum);")))
    proc = _run(SOURCE, wrong, "--shape", "64x96", "--seconds", "0.3", "--rotate-mib", "1")
    assert proc.returncode != 0 and "Mismatched elements" in proc.stderr
    bad = _run(SOURCE, wrong, "--shape", "64by96")
    assert bad.returncode == 2 and "--shape takes OUTxIN" in bad.stderr


def test_new_kind_times_other_values_and_checks_them(tmp_path):
    """--new-kind runs the new version on the same factors stored in other values; the
    check allows their rounding but still refuses a version that computes another y."""
    proc = _run(SOURCE, SOURCE, "--shape", "64x96", "--kind", "fp16", "--new-kind", "bf16", "--seconds", "0.3",
                "--rotate-mib", "1")
    assert proc.returncode == 0, proc.stderr
    assert "batch 1 fp16/bf16:" in proc.stdout and "new/old" in proc.stdout
    wrong = tmp_path / "wrong.cpp"
    line = "    y[b * ldy] = KIND == kInt8 ? scale * kInt8Unit * hsum256(sum) : hsum256(sum);"
    wrong.write_text(SOURCE.read_text().replace(line, line.replace(": hsum256(sum);", ": 1.5f * hsum256(sum);")))
    proc = _run(SOURCE, wrong, "--shape", "64x96", "--kind", "int8", "--new-kind", "bf16", "--seconds", "0.3",
                "--rotate-mib", "1")
    assert proc.returncode != 0 and "differ by" in proc.stderr and "int8 vs bf16" in proc.stderr


def test_cols_path_checks_the_column_index_kernel(tmp_path):
    """--path cols runs dsf_bitmap_spmm_cols_avx2 on both factors' decoded columns: a
    version whose column-index kernel computes another y is refused."""
    wrong = tmp_path / "wrong.cpp"
    text = SOURCE.read_text()
    line = "      y[b * ldy + r] = scale * s;"
    assert text.count(line) == 1
    wrong.write_text(text.replace(line, "      y[b * ldy + r] = 0.5f * scale * s;"))
    proc = _run(SOURCE, wrong, "--shape", "64x96", "--path", "cols", "--seconds", "0.3", "--rotate-mib", "1")
    assert proc.returncode != 0 and "Mismatched elements" in proc.stderr
    same = _run(SOURCE, wrong, "--shape", "64x96", "--path", "word", "--seconds", "0.3", "--rotate-mib", "1")
    assert same.returncode == 0, same.stderr  # the word path does not use that kernel


def test_avx512_word_paths_check_their_own_kernel(tmp_path):
    """--path word512 / word256 time the AVX-512 word path's two forms; a version whose
    256-bit variant computes another y is refused there and not on the 512-bit form;
    word256 takes bf16 values only."""
    from dsf_runtime.kernels import cpu_bitmap

    if not (cpu_bitmap._CAPS[0] and cpu_bitmap._CAPS[1]):
        pytest.skip("needs AVX-512 VBMI2 and AVX512_BF16")
    wrong = tmp_path / "wrong.cpp"
    text = SOURCE.read_text()
    line = "    y[b * ldy] = hsum256(sum);"
    assert text.count(line) == 1  # the 256-bit variants' (split fp32 x and the bf16 model's)
    wrong.write_text(text.replace(line, "    y[b * ldy] = 0.5f * hsum256(sum);"))
    for path, code in (("word256", 1), ("word512", 0)):
        proc = _run(SOURCE, wrong, "--shape", "64x96", "--path", path, "--kind", "bf16", "--batch", "2",
                    "--seconds", "0.3", "--rotate-mib", "1")
        assert (proc.returncode != 0 and "Mismatched elements" in proc.stderr) == bool(code), proc.stderr
    bad = _run(SOURCE, SOURCE, "--path", "word256", "--kind", "fp16")
    assert bad.returncode == 2 and "bf16 values only" in bad.stderr
