"""The vLLM plugin, for real: vLLM's CPU build (in its own environment, .venv-vllm, built by
scripts/vllm_env.sh; CI builds it) loads tiny DSF checkpoints through our quantization
method. Greedy tokens must equal `dsf generate`'s, tensor parallelism must reproduce one
rank's log-probabilities, `vllm serve` must answer the OpenAI API, and bad checkpoints
must fail at load with our error. Skipped, with the reason, where .venv-vllm is absent."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests_support import tiny_dsf_checkpoint

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
CHECKS = Path(__file__).with_name("vllm_checks.py")
PROMPTS = ["It is a truth universally acknowledged", "Emma Woodhouse, handsome", "The"]

pytestmark = pytest.mark.skipif(
    not VLLM_PYTHON.exists(), reason="vLLM's environment is not built here (bash scripts/vllm_env.sh)"
)


def _vllm_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_")}  # no CPU interpreter there
    # fp32 activations in every kernel path (as the fp32_activations fixture): these tests
    # compare logprobs between tensor-parallel layouts at 1e-3, and the AMX and pair paths
    # round x to bf16 (tests/kernels checks them against that rounding).
    pinned = {"DSF_ROUND_X": "off", "DSF_AMX": "off"}
    return {**env, **pinned, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}


def run_vllm(ckpt: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [str(VLLM_PYTHON), str(CHECKS), str(ckpt), str(out), *extra]
    for p in PROMPTS:
        args += ["--prompt", p]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=_vllm_env())


def vllm_result(ckpt: Path, out: Path, *extra: str) -> dict:
    """{"outputs": per prompt {"token_ids", "logprobs"}, "output_layer": per worker its form}."""
    proc = run_vllm(ckpt, out, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


PACKED_FORMS = {"fp32", "bf16", "int8 x scale/32"}  # dense_cpu.PackedWeight.form


def _mixed(name: str) -> bool:
    """Layer 1's k_proj and down_proj are one pruned matrix, the rest factor pairs: a merged
    layer then mixes both (and under TP=2 takes the column cut, not the gather cut)."""
    return ".layers.1." in name and name.endswith(("k_proj", "down_proj"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_tokenizer):
    return tiny_dsf_checkpoint(tmp_path_factory.mktemp("vllm") / "tiny-dsf", tiny_tokenizer, one_matrix=_mixed)


@pytest.fixture(scope="module")
def dsf_tokens(ckpt):
    from dsf_runtime import load_model
    from dsf_runtime.generate import generate_text

    model, tok = load_model(ckpt)
    return [list(generate_text(model, tok, p, max_tokens=8).token_ids) for p in PROMPTS]


@pytest.fixture(scope="module")
def one_rank(ckpt, tmp_path_factory):
    return vllm_result(ckpt, tmp_path_factory.mktemp("tp1") / "out.json", "--tp", "1")


def test_offline_greedy_equals_dsf_generate(one_rank, dsf_tokens):
    assert [r["token_ids"] for r in one_rank["outputs"]] == dsf_tokens
    # the output layer runs on dsf-runtime's dense op (fp32 model on CPU), not vLLM's GEMM
    assert len(one_rank["output_layer"]) == 1 and set(one_rank["output_layer"]) <= PACKED_FORMS


def test_tensor_parallel_matches_one_rank(ckpt, one_rank, tmp_path):
    two = vllm_result(ckpt, tmp_path / "out.json", "--tp", "2")
    assert [r["token_ids"] for r in two["outputs"]] == [r["token_ids"] for r in one_rank["outputs"]]
    assert len(two["output_layer"]) == 2 and set(two["output_layer"]) <= PACKED_FORMS
    worst = 0.0
    for a, b in zip(one_rank["outputs"], two["outputs"]):
        for step_a, step_b in zip(a["logprobs"], b["logprobs"]):
            shared = set(step_a) & set(step_b)
            assert shared
            worst = max(worst, max(abs(step_a[t] - step_b[t]) for t in shared))
    assert worst < 1e-3, worst


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_answers_like_dsf_generate(ckpt, dsf_tokens, tiny_tokenizer, tmp_path):
    """`vllm serve` in its default (torch.compile) mode, --quantization dsf given explicitly."""
    import httpx
    import openai

    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    cmd = [str(VLLM_PYTHON.with_name("vllm")), "serve", str(ckpt), "--port", str(port), "--host", "127.0.0.1"]
    cmd += ["--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "4", "--quantization", "dsf"]
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_vllm_env())
    try:
        deadline = time.time() + 500
        while time.time() < deadline:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(2)
        else:
            pytest.fail("vllm serve did not come up: " + (tmp_path / "serve.log").read_text()[-3000:])
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        for prompt, want in zip(PROMPTS, dsf_tokens):
            done = client.completions.create(
                model=str(ckpt), prompt=prompt, max_tokens=8, temperature=0, extra_body={"return_token_ids": True}
            )
            choice = done.choices[0].model_dump()
            assert choice["token_ids"] == want
            assert tiny_tokenizer.decode(want, skip_special_tokens=True).startswith(choice["text"])
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _copy(ckpt: Path, dest: Path) -> Path:
    shutil.copytree(ckpt, dest)
    return dest


def test_corrupt_factor_fails_at_load_with_our_error(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = _copy(ckpt, tmp_path / "bad")
    state = load_file(bad / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.R.row_offsets"
    state[key] = state[key].clone()
    state[key][3] += 1  # a row now claims a value its bitmap does not have
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    proc = run_vllm(bad, tmp_path / "out.json", "--tp", "1")
    assert proc.returncode != 0
    want = "CheckpointError: model.layers.0.mlp.down_proj.R: bitmap popcounts do not match row_offsets"
    assert want in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("format", "os.system", "unknown format 'os.system'; known: bitmap, bsr, csr"),
        ("version", 99, "checkpoint version 99 is not supported"),
    ],
)
def test_unknown_format_or_version_is_refused_by_name(ckpt, tmp_path, field, value, message):
    bad = _copy(ckpt, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"][field] = value
    (bad / "config.json").write_text(json.dumps(config))
    proc = run_vllm(bad, tmp_path / "out.json", "--tp", "1")
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr


def test_checks_script_binds_every_rank():
    sys.path.insert(0, str(CHECKS.parent))
    from vllm_checks import cpu_binding

    groups = cpu_binding(2).split("|")
    assert len(groups) == 2 and all(groups)
    assert torch.get_num_threads() >= 1
