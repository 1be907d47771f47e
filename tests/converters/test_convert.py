"""`dsf convert`: pruned models stored dense and compressed-tensors checkpoints become DSF
checkpoints; the pruned weights come back bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dsf_runtime.checkpoint import load_model
from dsf_runtime.cli import main
from dsf_runtime.linear import DSFLinear
from dsf_runtime.models import compressible_linears

FIXTURES = Path(__file__).parents[1] / "fixtures" / "compressed_tensors"


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny LLaMA saved dense in bf16 with every MLP linear 60% zeros (attention untouched)."""
    from conftest import make_tiny_llama

    model = make_tiny_llama(len(tiny_tokenizer)).to(torch.bfloat16)
    with torch.no_grad():
        for name in compressible_linears(model):
            if ".mlp." in name:
                w = model.get_submodule(name).weight
                w.mul_(torch.rand(w.shape, generator=torch.Generator().manual_seed(len(name))) >= 0.6)
    path = tmp_path_factory.mktemp("pruned") / "dense"
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path, model


def test_pruned_dense_round_trips_bit_identically(pruned_dir, tmp_path, capsys):
    path, dense = pruned_dir
    assert main(["convert", str(path), str(tmp_path / "ck"), "--min-sparsity", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "6 of 14 linears packed" in printed and "dense" in printed
    model, _ = load_model(tmp_path / "ck", backend="dense-ref")
    for name in compressible_linears(dense):
        module = model.get_submodule(name)
        original = dense.get_submodule(name).weight
        if ".mlp." in name:
            assert isinstance(module, DSFLinear) and module.L.values.dtype == torch.bfloat16
            assert torch.equal(module.L.to_dense(), original)  # the same bits
        else:
            assert type(module) is torch.nn.Linear
    log = json.loads((tmp_path / "ck" / "conversion_log.json").read_text())
    assert {r["name"] for r in log["layers"] if r["packed"]} == {n for n in compressible_linears(dense) if ".mlp." in n}


def test_nothing_sparse_enough_is_a_clear_error(pruned_dir, tmp_path, capsys):
    path, _ = pruned_dir
    assert main(["convert", str(path), str(tmp_path / "ck"), "--min-sparsity", "0.9"]) == 2
    assert "no linear layer" in capsys.readouterr().err
    assert main(["convert", str(path), str(tmp_path / "ck"), "--min-sparsity", "1.5"]) == 2


def test_compressed_tensors_checkpoint_converts_and_matches(tmp_path, tiny_tokenizer, fp32_activations):
    src = tmp_path / "ct"
    shutil.copytree(FIXTURES / "sparse-bitmask-bf16", src)
    tiny_tokenizer.save_pretrained(src)
    assert main(["convert", str(src), str(tmp_path / "ck")]) == 0
    from safetensors.torch import load_file

    model, tok = load_model(tmp_path / "ck", dtype=torch.float32)
    ref = load_file(src / "reference.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(ref["input_ids"]).logits, ref["logits"], rtol=1e-3, atol=2e-3)
    assert tok is not None


def test_export_round_trips_through_compressed_tensors(pruned_dir, tmp_path, capsys):
    """convert then export: a sparse-bitmask checkpoint whose decompressed weights are the
    pruned model's, bit for bit (read back with our reader)."""
    from dsf_runtime.ct_reader import is_compressed_tensors, load_compressed_tensors

    path, dense = pruned_dir
    assert main(["convert", str(path), str(tmp_path / "ck"), "--min-sparsity", "0.5"]) == 0
    assert main(["export", str(tmp_path / "ck"), str(tmp_path / "ct")]) == 0
    assert "sparse-bitmask" in capsys.readouterr().out
    assert is_compressed_tensors(tmp_path / "ct")
    back, _ = load_compressed_tensors(tmp_path / "ct", backend="dense-ref")
    for name in compressible_linears(dense):
        module, original = back.get_submodule(name), dense.get_submodule(name).weight
        weight = module.L.to_dense() if isinstance(module, DSFLinear) else module.weight
        assert torch.equal(weight, original), name


def test_factor_pairs_export_dense_with_a_note_or_are_refused(tmp_path, tiny_tokenizer, capsys):
    from dsf_runtime.converters.pack import write_packed
    from tests_support import tiny_dsf_llama

    model = tiny_dsf_llama()
    factors = {n: (m.L.to_dense(), m.R.to_dense()) for n, m in model.named_modules() if isinstance(m, DSFLinear)}
    from conftest import make_tiny_llama

    base = make_tiny_llama(128)
    write_packed(base, tiny_tokenizer, factors, tmp_path / "dsf", sparsity=0.5)
    assert main(["export", str(tmp_path / "dsf"), str(tmp_path / "ct"), "--keep-sparse"]) == 2
    assert "factor pairs" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "dsf"), str(tmp_path / "ct")]) == 0
    assert "factor structure and its speed are lost" in capsys.readouterr().out
    from safetensors.torch import load_file

    state = load_file(tmp_path / "ct" / "model.safetensors")
    name = next(iter(factors))
    L, R = factors[name]
    torch.testing.assert_close(state[f"{name}.weight"].float(), (L.double() @ R.double()).float())


def test_info_reports_what_was_packed(pruned_dir, tmp_path, capsys):
    path, _ = pruned_dir
    assert main(["convert", str(path), str(tmp_path / "ck"), "--min-sparsity", "0.5"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert "converted: 6 of 14 linears packed" in out
    assert "model.layers.0.self_attn.q_proj" in out.split("kept dense")[1]


def test_value_dtype_narrows_a_pruned_fp32_model(tmp_path, tiny_tokenizer):
    from conftest import make_tiny_llama

    model = make_tiny_llama(len(tiny_tokenizer))
    with torch.no_grad():
        for name in compressible_linears(model):
            w = model.get_submodule(name).weight
            w.mul_(torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) >= 0.5)
    model.save_pretrained(tmp_path / "dense")
    tiny_tokenizer.save_pretrained(tmp_path / "dense")
    assert main(["convert", str(tmp_path / "dense"), str(tmp_path / "ck"), "--value-dtype", "bfloat16"]) == 0
    ck, _ = load_model(tmp_path / "ck", backend="dense-ref")
    name = compressible_linears(model)[0]
    assert ck.get_submodule(name).L.values.dtype == torch.bfloat16
    want = model.get_submodule(name).weight.to(torch.bfloat16)
    assert torch.equal(ck.get_submodule(name).L.to_dense(), want)
