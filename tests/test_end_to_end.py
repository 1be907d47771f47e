"""Golden path on a tiny random LLaMA: compress -> save -> load -> generate.

The loaded sparse model must reproduce the model whose weights are the dense
products L @ R of the very factors stored in the checkpoint."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dsf_runtime.checkpoint import load_model, read_quant_config
from dsf_runtime.converters.factorize import split_budget
from dsf_runtime.converters.pipeline import make_job, run_compress
from dsf_runtime.linear import DSFLinear
from dsf_runtime.models import compressible_linears
from dsf_runtime.patch import dsf_modules


@pytest.fixture(scope="module")
def compressed(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tiny-dsf"
    job = make_job(str(tiny_model_dir), out, sparsity=0.5, preset_name="fast", nsamples=8, seqlen=64, progress=False)
    path, result = run_compress(job)
    return path, result


def dense_product_model(model_dir, sparse_model):
    """The dense model with each compressed W replaced by L @ R from the checkpoint."""
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, module in dsf_modules(sparse_model).items():
            W = module.L.to_dense().double() @ module.R.to_dense().double()
            dense.get_submodule(name).weight.copy_(W.float())
    return dense


def test_every_linear_is_compressed_within_budget(compressed, tiny_model_dir):
    path, result = compressed
    model, _ = load_model(path)
    names = compressible_linears(model)
    assert set(dsf_modules(model)) == set(names) and len(names) == 14
    _, quant = read_quant_config(path)
    for name, m in dsf_modules(model).items():
        budget = split_budget(m.out_features, m.in_features, 0.5)
        assert m.L.nnz + m.R.nnz <= budget.total, name
        assert quant.modules[name].nnz_left == m.L.nnz
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, DSFLinear)
    assert all(r.rel_error < 0.2 for r in result.reports)


def test_logits_match_dense_product(compressed, tiny_model_dir, tiny_tokenizer, fp32_activations):
    path, _ = compressed
    sparse, tokenizer = load_model(path)
    dense = dense_product_model(tiny_model_dir, sparse)
    ids = tokenizer("It was the best of times, it was the worst of times", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = sparse(ids).logits, dense(ids).logits
    # Same factors, same fp32 math in a different order: differences at rounding level.
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_greedy_tokens_match_dense_product(compressed, tiny_model_dir):
    path, _ = compressed
    sparse, tokenizer = load_model(path)
    dense = dense_product_model(tiny_model_dir, sparse)
    ids = tokenizer("Captain Wentworth", return_tensors="pt")["input_ids"]
    kw = dict(
        max_new_tokens=24,
        min_new_tokens=24,
        do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
        attention_mask=torch.ones_like(ids),
    )
    with torch.no_grad():
        assert sparse.generate(ids, **kw).tolist() == dense.generate(ids, **kw).tolist()


def test_compression_changes_the_model(compressed, tiny_model_dir):
    """Guard against a no-op: the compressed model's logits differ from the original."""
    path, _ = compressed
    sparse, tokenizer = load_model(path)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = tokenizer("Anne Elliot", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(sparse(ids).logits, original(ids).logits, atol=1e-3)


def test_tied_embeddings_survive_round_trip(tmp_path, tiny_tokenizer):
    from tests_support import save_tiny

    model_dir = save_tiny(tmp_path / "tied", tiny_tokenizer, tie_word_embeddings=True)
    job = make_job(str(model_dir), tmp_path / "tied-dsf", nsamples=4, seqlen=32, progress=False)
    path, _ = run_compress(job)
    model, _ = load_model(path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
