"""compressed-tensors sparse checkpoints, made by the compressed-tensors library itself
(tests/fixtures/compressed_tensors, scripts/make_ct_fixtures.py), load sparsely through our
own reader and give the logits of the pruned dense model; bad files get one clear error."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsf_runtime.ct_reader import SPARSE_FORMATS, is_compressed_tensors, load_compressed_tensors
from dsf_runtime.errors import CheckpointError
from tests_support import edit_ct_config, edit_ct_tensors
from dsf_runtime.linear import DSFLinear

FIXTURES = Path(__file__).parent / "fixtures" / "compressed_tensors"
NAMES = ["sparse-bitmask-bf16", "sparse-bitmask-fp16", "sparse-24-bitmask-bf16"]


@pytest.mark.parametrize("name", NAMES)
def test_fixture_loads_sparse_and_matches_the_pruned_dense_logits(name, fp32_activations):
    path = FIXTURES / name
    assert is_compressed_tensors(path)
    model, _ = load_compressed_tensors(path, with_tokenizer=False, dtype=torch.float32)
    ref = load_file(path / "reference.safetensors")
    with torch.no_grad():
        logits = model(ref["input_ids"]).logits
    # fp16 tolerance: the reference ran in another transformers version, in float32
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-3, atol=2e-3)
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, DSFLinear) and up.rank is None and up.fmt == "bitmap"
    half = up.out_features * up.in_features // 2
    assert up.L.nnz == half if "24" in name else 0.45 * 2 * half < up.L.nnz <= half  # pruned to half (ties in bf16)
    assert not any(p.numel() == up.out_features * up.in_features for p in up.parameters())  # no dense W


def test_ignored_linears_stay_dense():
    model, _ = load_compressed_tensors(FIXTURES / "sparse-bitmask-bf16", with_tokenizer=False)
    assert type(model.model.layers[1].mlp.down_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[1].mlp.up_proj, DSFLinear)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda qc: qc["sparsity_config"].update(format="sparse-zigzag"), "'sparse-zigzag' is not supported"),
        (lambda qc: qc["sparsity_config"].update(format="compressed_tensors.os.system"), "is not supported; supported"),
        (lambda qc: qc.update(format="pack-quantized", config_groups={"g": {}}), "quantized compressed-tensors"),
    ],
)
def test_unknown_or_quantized_formats_are_named(ct_copy, change, message):
    edit_ct_config(ct_copy, change)
    with pytest.raises(CheckpointError, match=message) as err:
        load_compressed_tensors(ct_copy, with_tokenizer=False)
    assert "sparse-bitmask, sparse-24-bitmask" in str(err.value)
    assert SPARSE_FORMATS == ("sparse-bitmask", "sparse-24-bitmask")


P = "model.layers.0.mlp.up_proj"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.update({f"{P}.shape": torch.tensor([112, 65])}), "bitmask is torch.uint8\\[112, 8\\], expected"),
        (lambda s: s.update({f"{P}.compressed": s[f"{P}.compressed"][:-1]}), "compressed has \\d+ values, its bitmask"),
        (lambda s: s[f"{P}.row_offsets"].__setitem__(1, 7), "row_offsets do not match"),
        (lambda s: s.pop(f"{P}.row_offsets"), f"lacks {P}.row_offsets"),
        (lambda s: s.update({f"{P}.compressed": s[f"{P}.compressed"].to(torch.int8)}), "supported value dtypes"),
        (lambda s: s.update({f"{P}.shape": torch.tensor([112])}), "not the \\(rows, cols\\)"),
        (lambda s: s[f"{P}.bitmask"].__setitem__((0, 0), s[f"{P}.bitmask"][0, 0] ^ 1), "row_offsets do not match"),
        (lambda s: s.pop("model.norm.weight"), "lacks 1 tensors"),
    ],
)
def test_inconsistent_tensors_are_refused_by_name(ct_copy, change, message):
    edit_ct_tensors(ct_copy, change)
    with pytest.raises(CheckpointError, match=message):
        load_compressed_tensors(ct_copy, with_tokenizer=False)


def test_nan_values_are_refused(ct_copy):
    edit_ct_tensors(ct_copy, lambda s: s[f"{P}.compressed"].__setitem__(0, float("nan")))
    with pytest.raises(CheckpointError, match=f"{P}.L: values contain NaN"):
        load_compressed_tensors(ct_copy, with_tokenizer=False)


def test_dsf_generate_runs_a_compressed_tensors_checkpoint(tmp_path, tiny_tokenizer, capsys):
    from dsf_runtime.cli import main

    src = tmp_path / "ct"
    shutil.copytree(FIXTURES / "sparse-24-bitmask-bf16", src)
    tiny_tokenizer.save_pretrained(src)
    assert main(["generate", str(src), "--prompt", "It is a truth", "--max-tokens", "4"]) == 0
    assert "cpu-bitmap x14" in capsys.readouterr().err  # every linear run sparse, and said so
