"""The `dsf` CLI as a user runs it: commands work, bad input is one line and exit 2."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from dsf_runtime.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsf_runtime.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def ckpt(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "ckpt"
    code = main(["compress", str(tiny_model_dir), str(out), "--sparsity", "0.6", "--nsamples", "4", "--seqlen", "32"])
    assert code == 0
    return out


def cli(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    """Run `dsf ARGS` in this process as the console script would: (exit code, stdout, stderr).
    Logging goes to stderr as outside pytest (the CLI's basicConfig is a no-op under pytest's handlers)."""
    monkeypatch.setattr(logging.root, "handlers", [])
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_info_lists_every_layer(ckpt, capsys, monkeypatch):
    code, out, err = cli(capsys, monkeypatch, "info", str(ckpt))
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("model.layers.")]
    assert len(lines) == 14
    assert "14 compressed linears" in out
    code, out, _ = cli(capsys, monkeypatch, "info", str(ckpt), "--json")
    layers = json.loads(out)["layers"]
    assert all(row["total_density"] <= 0.4 + 1e-9 for row in layers)
    assert all(0 < row["density_left"] <= 1 and 0 < row["density_right"] <= 1 for row in layers)


def test_generate_reports_backend(ckpt):
    """The one subprocess test: the real console entry point, end to end."""
    proc = run_cli("generate", str(ckpt), "--prompt", "Elizabeth", "--max-tokens", "5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Elizabeth")
    from dsf_runtime.kernels import BACKENDS

    expected = "cpu-bitmap" if BACKENDS["cpu-bitmap"].available() else "torch-csr"  # the default format is bitmap
    assert f"backend: {expected} x14" in proc.stderr
    bad = run_cli("nonsense")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "invalid choice" in bad.stderr


def test_eval_prints_perplexity(ckpt, tiny_model_dir, tmp_path, capsys, monkeypatch):
    text = tmp_path / "held.txt"
    text.write_text("It is a truth universally acknowledged. " * 40)
    for model in (ckpt, tiny_model_dir):
        code, out, err = cli(
            capsys, monkeypatch, "eval", str(model), "--text", str(text), "--window", "64", "--stride", "32"
        )
        assert code == 0, err
        assert out.startswith("perplexity ")
        assert float(out.split()[1]) > 1.0


def test_eval_in_bfloat16_is_close_to_float32(ckpt, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """--dtype bfloat16 runs a dense model and a DSF checkpoint in bf16: a perplexity
    within bf16's rounding of the float32 one (and not the same number: bf16 really ran)."""
    text = tmp_path / "held.txt"
    text.write_text("It is a truth universally acknowledged. " * 40)
    for model in (ckpt, tiny_model_dir):
        ppl = {}
        for dtype in ("float32", "bfloat16"):
            args = ("eval", str(model), "--text", str(text), "--window", "64", "--stride", "32", "--dtype", dtype)
            code, out, err = cli(capsys, monkeypatch, *args)
            assert code == 0, err
            ppl[dtype] = float(out.split()[1])
        assert ppl["bfloat16"] != ppl["float32"]
        assert abs(ppl["bfloat16"] / ppl["float32"] - 1) < 0.05, ppl


@pytest.fixture
def one_line_error(capsys, monkeypatch):
    """Check that `dsf ARGS` exits with code 2 and one line on stderr containing ``pattern``."""

    def check(pattern: str, *args: str) -> None:
        code, _, err = cli(capsys, monkeypatch, *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert pattern in lines[0], lines[0]

    return check


@pytest.mark.parametrize("sparsity", ["0", "1", "1.5", "-0.2"])
def test_bad_sparsity(tiny_model_dir, tmp_path, sparsity, one_line_error):
    one_line_error("sparsity", "compress", str(tiny_model_dir), str(tmp_path / "o"), "--sparsity", sparsity)


def test_unsupported_model(tmp_path, one_line_error):
    bad = tmp_path / "gpt"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    one_line_error("not supported", "compress", str(bad), str(tmp_path / "o"))
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error("no config.json", "compress", str(empty), str(tmp_path / "o"))
    one_line_error("neither a model directory", "compress", str(tmp_path / "absent"), str(tmp_path / "o"))


def test_checkpoint_missing_files(ckpt, tmp_path, one_line_error):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "model.safetensors").unlink()
    one_line_error("missing model.safetensors", "info", str(broken))
    one_line_error("missing model.safetensors", "generate", str(broken))
    (broken / "config.json").unlink()
    one_line_error("missing config.json", "eval", str(broken))


def test_bad_options(ckpt, one_line_error):
    one_line_error("--max-tokens", "generate", str(ckpt), "--max-tokens", "0")
    one_line_error("unknown backend", "generate", str(ckpt), "--backend", "nope")
    one_line_error("--stride", "eval", str(ckpt), "--window", "8", "--stride", "16")
    one_line_error("--dtype: invalid choice", "generate", str(ckpt), "--dtype", "float64")
    one_line_error("give --checkpoint too", "bench", "decode", "--external", "llama.cpp")
    one_line_error("invalid choice", "nonsense")


def test_info_without_a_checkpoint_lists_backends_and_settings(capsys, monkeypatch):
    monkeypatch.setenv("DSF_DISABLED_BACKENDS", "torch-bsr")
    assert main(["info", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    bsr = [r for r in payload["backends"] if r["backend"] == "torch-bsr" and r["format"] == "bsr"]
    assert bsr and not bsr[0]["ok"] and bsr[0]["reason"] == "disabled by DSF_DISABLED_BACKENDS"
    assert {r["name"] for r in payload["settings"]} >= {"DSF_CPU_ISA", "DSF_DISABLED_BACKENDS", "DSF_API_KEY"}
