"""The `dsf` CLI as a user runs it: commands work, bad input is one line and exit 2."""

from __future__ import annotations

import json
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


def test_info_lists_every_layer(ckpt):
    proc = run_cli("info", str(ckpt))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("model.layers.")]
    assert len(lines) == 14
    assert "14 compressed linears" in proc.stdout
    proc = run_cli("info", str(ckpt), "--json")
    layers = json.loads(proc.stdout)["layers"]
    assert all(row["total_density"] <= 0.4 + 1e-9 for row in layers)
    assert all(0 < row["density_left"] <= 1 and 0 < row["density_right"] <= 1 for row in layers)


def test_generate_reports_backend(ckpt):
    proc = run_cli("generate", str(ckpt), "--prompt", "Elizabeth", "--max-tokens", "5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Elizabeth")
    from dsf_runtime.kernels import BACKENDS

    expected = "cpu-bitmap" if BACKENDS["cpu-bitmap"].available() else "torch-csr"  # the default format is bitmap
    assert f"backend: {expected} x14" in proc.stderr


def test_eval_prints_perplexity(ckpt, tiny_model_dir, tmp_path):
    text = tmp_path / "held.txt"
    text.write_text("It is a truth universally acknowledged. " * 40)
    for model in (ckpt, tiny_model_dir):
        proc = run_cli("eval", str(model), "--text", str(text), "--window", "64", "--stride", "32")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("perplexity ")
        assert float(proc.stdout.split()[1]) > 1.0


def _one_line_error(proc, pattern):
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert pattern in lines[0], lines[0]


@pytest.mark.parametrize("sparsity", ["0", "1", "1.5", "-0.2"])
def test_bad_sparsity(tiny_model_dir, tmp_path, sparsity):
    _one_line_error(run_cli("compress", str(tiny_model_dir), str(tmp_path / "o"), "--sparsity", sparsity), "sparsity")


def test_unsupported_model(tmp_path):
    bad = tmp_path / "gpt"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    _one_line_error(run_cli("compress", str(bad), str(tmp_path / "o")), "not supported")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(run_cli("compress", str(empty), str(tmp_path / "o")), "no config.json")
    _one_line_error(run_cli("compress", str(tmp_path / "absent"), str(tmp_path / "o")), "neither a model directory")


def test_checkpoint_missing_files(ckpt, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "model.safetensors").unlink()
    _one_line_error(run_cli("info", str(broken)), "missing model.safetensors")
    _one_line_error(run_cli("generate", str(broken)), "missing model.safetensors")
    (broken / "config.json").unlink()
    _one_line_error(run_cli("eval", str(broken)), "missing config.json")


def test_bad_options(ckpt):
    _one_line_error(run_cli("generate", str(ckpt), "--max-tokens", "0"), "--max-tokens")
    _one_line_error(run_cli("generate", str(ckpt), "--backend", "nope"), "unknown backend")
    _one_line_error(run_cli("eval", str(ckpt), "--window", "8", "--stride", "16"), "--stride")
    _one_line_error(run_cli("nonsense"), "invalid choice")


def test_info_without_a_checkpoint_lists_backends_and_settings(capsys, monkeypatch):
    monkeypatch.setenv("DSF_DISABLED_BACKENDS", "torch-bsr")
    assert main(["info", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    bsr = [r for r in payload["backends"] if r["backend"] == "torch-bsr" and r["format"] == "bsr"]
    assert bsr and not bsr[0]["ok"] and bsr[0]["reason"] == "disabled by DSF_DISABLED_BACKENDS"
    assert {r["name"] for r in payload["settings"]} >= {"DSF_CPU_ISA", "DSF_DISABLED_BACKENDS", "DSF_API_KEY"}
