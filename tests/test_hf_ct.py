"""transformers' from_pretrained loads compressed-tensors sparse checkpoints (made by the
compressed-tensors library, tests/fixtures/compressed_tensors) into one-matrix DSFLinear
modules; other compressed-tensors sections still go to transformers' own quantizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AutoQuantizationConfig

import dsf_runtime
from dsf_runtime import hf_ct
from dsf_runtime.ct_reader import load_compressed_tensors
from dsf_runtime.errors import CheckpointError
from tests_support import edit_ct_config, edit_ct_tensors
from dsf_runtime.linear import DSFLinear
from dsf_runtime.patch import dsf_modules

FIXTURES = Path(__file__).parent / "fixtures" / "compressed_tensors"
NAMES = ["sparse-bitmask-bf16", "sparse-bitmask-fp16", "sparse-24-bitmask-bf16"]


@pytest.mark.parametrize("name", NAMES)
def test_from_pretrained_runs_the_checkpoint_sparse(name, fp32_activations):
    path = FIXTURES / name
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref = load_file(path / "reference.safetensors")
    with torch.no_grad():
        logits = model(ref["input_ids"]).logits
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-3, atol=2e-3)  # fp16 tolerance, as the reader's test
    direct, _ = load_compressed_tensors(path, with_tokenizer=False, dtype=torch.float32)
    with torch.no_grad():  # the same layers and kernels as the direct reader
        torch.testing.assert_close(logits, direct(ref["input_ids"]).logits, rtol=0, atol=0)
    ours, theirs = dsf_modules(model), dsf_modules(direct)
    assert sorted(ours) == sorted(theirs) and len(ours) >= 13
    for m in ours.values():
        assert m.rank is None and m.fmt == "bitmap" and m.backend_name != "dense-ref"
        assert not any(t.numel() == m.out_features * m.in_features for t in m.state_dict().values())  # no dense W
    assert not any(type(m).__name__ == "CompressedTensorsSlot" for m in model.modules())
    assert model.config.quantization_config.to_dict()["quant_method"] == "compressed-tensors"


def test_ignored_linears_stay_dense():
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / "sparse-bitmask-bf16")
    assert type(model.model.layers[1].mlp.down_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[1].mlp.up_proj, DSFLinear)


def test_quantized_sections_still_go_to_transformers():
    section = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {}}}
    if importlib.util.find_spec("compressed_tensors") is None:
        with pytest.raises(ImportError, match="compressed-tensors"):  # transformers' own message
            AutoQuantizationConfig.from_dict(section)
    else:  # pragma: no cover - only where compressed-tensors is installed
        assert AutoQuantizationConfig.from_dict(section).quant_method == "compressed-tensors"


def test_sparse_sections_route_to_ours_once():
    section = {"quant_method": "compressed-tensors", "sparsity_config": {"format": "sparse-bitmask"}}
    assert AutoQuantizationConfig.from_dict(section).quant_method == hf_ct.QUANT_METHOD
    routing = AUTO_QUANTIZATION_CONFIG_MAPPING["compressed-tensors"]
    dsf_runtime.hf._REGISTERED = False
    try:
        assert dsf_runtime.hf.register() is True
    finally:
        dsf_runtime.hf._REGISTERED = True
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["compressed-tensors"] is routing  # not wrapped twice


def _key(path: Path, suffix: str) -> str:
    return next(k for k in load_file(path / "model.safetensors") if k.endswith(suffix))


def test_bad_format_is_named(ct_copy):
    edit_ct_config(ct_copy, lambda qc: qc["sparsity_config"].update(format="compressed_tensors.os.system"))
    with pytest.raises(CheckpointError, match="is not supported; supported: sparse-bitmask, sparse-24-bitmask"):
        AutoModelForCausalLM.from_pretrained(ct_copy)


def test_value_count_mismatch_is_refused(ct_copy):
    key = _key(ct_copy, ".compressed")
    edit_ct_tensors(ct_copy, lambda s: s.__setitem__(key, s[key][:-1].clone()))
    with pytest.raises(CheckpointError, match="values, its bitmask marks"):
        AutoModelForCausalLM.from_pretrained(ct_copy)


def test_bitmask_of_the_wrong_shape_is_refused(ct_copy):
    key = _key(ct_copy, ".bitmask")
    edit_ct_tensors(ct_copy, lambda s: s.__setitem__(key, s[key][:-1].clone()))
    with pytest.raises(CheckpointError, match="does not fit the model"):
        AutoModelForCausalLM.from_pretrained(ct_copy)


def test_missing_part_is_named(ct_copy):
    key = _key(ct_copy, ".row_offsets")
    edit_ct_tensors(ct_copy, lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match="lacks .*row_offsets"):
        AutoModelForCausalLM.from_pretrained(ct_copy)


def test_nan_values_are_refused(ct_copy):
    key = _key(ct_copy, ".compressed")

    def nan(state):
        state[key] = state[key].clone()
        state[key][3] = float("nan")

    edit_ct_tensors(ct_copy, nan)
    with pytest.raises(CheckpointError, match="NaN"):
        AutoModelForCausalLM.from_pretrained(ct_copy)
