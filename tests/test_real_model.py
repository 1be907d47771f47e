"""End to end on the real embedded model (SmolLM2-135M): compress -> save -> load ->
generate, checked against the dense product of the stored factors. Marked slow
(about 2 minutes on 2 cores); CI runs it, `pytest -m "not slow"` skips it."""

from __future__ import annotations

import pytest
import torch

from dsf_runtime.evaluate import perplexity
from dsf_runtime.checkpoint import load_model
from dsf_runtime.converters.calibrate import compress_sequential
from dsf_runtime.converters.config import DSFConfig
from dsf_runtime.data import calibration_text, evaluation_text, sample_windows, tokenize
from dsf_runtime.converters.factorize import split_budget
from dsf_runtime.converters.methods import make_method
from dsf_runtime.converters.pack import write_packed
from dsf_runtime.models import load_dense
from dsf_runtime.patch import dsf_modules

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    pytest.importorskip("gguf")
    model, tokenizer = load_dense("smollm2-135m")
    eval_ids = tokenize(tokenizer, evaluation_text())[:2048]
    dense_ppl = perplexity(model, eval_ids, window=512, stride=512, progress=False)
    windows = sample_windows(tokenize(tokenizer, calibration_text()), 8, 256)
    config = DSFConfig(sparsity=0.5, outer_iters=3, finalize_iters=3)
    result = compress_sequential(model, windows, make_method("dsf", 0.5, config), progress=False)
    out = tmp_path_factory.mktemp("real") / "smollm2-dsf"
    write_packed(model, tokenizer, result.factors, out, sparsity=0.5, factorization=config.model_dump())
    return out, eval_ids, dense_ppl


def test_real_model_round_trip(real, fp32_activations):
    path, eval_ids, dense_ppl = real
    sparse, tokenizer = load_model(path)
    mods = dsf_modules(sparse)
    assert len(mods) == 30 * 7
    for name, m in mods.items():
        assert m.L.nnz + m.R.nnz <= split_budget(m.out_features, m.in_features, 0.5).total, name

    reference, _ = load_dense("smollm2-135m")
    with torch.no_grad():
        for name, m in mods.items():
            reference.get_submodule(name).weight.copy_((m.L.to_dense().double() @ m.R.to_dense().double()).float())
    ids = tokenizer("It is a truth universally acknowledged, that", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits, reference(ids).logits, rtol=1e-3, atol=1e-3)
    kw = dict(
        max_new_tokens=16,
        min_new_tokens=16,
        do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
        attention_mask=torch.ones_like(ids),
    )
    with torch.no_grad():
        assert sparse.generate(ids, **kw).tolist() == reference.generate(ids, **kw).tolist()

    dsf_ppl = perplexity(sparse, eval_ids, window=512, stride=512, progress=False)
    # Half the weights gone costs quality, but a working DSF stays close to dense.
    assert dense_ppl < dsf_ppl < 1.6 * dense_ppl, (dense_ppl, dsf_ppl)
