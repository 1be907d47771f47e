"""transformers' from_pretrained loads DSF checkpoints into DSFLinear modules."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import dsf_runtime
from dsf_runtime.checkpoint import load_model
from dsf_runtime.converters.pipeline import make_job, run_compress
from dsf_runtime.linear import DSFLinear
from dsf_runtime.patch import dsf_modules


@pytest.fixture(scope="module", params=["bitmap", "csr", "bsr"])
def ckpt(request, tmp_path_factory, tiny_tokenizer):
    from tests_support import save_tiny

    root = tmp_path_factory.mktemp(f"hf-{request.param}")
    base = save_tiny(root / "base", tiny_tokenizer, tie_word_embeddings=True)
    path, _ = run_compress(make_job(str(base), root / "ckpt", nsamples=4, seqlen=32, progress=False, fmt=request.param))
    return path


def test_from_pretrained_builds_dsf_modules(ckpt):
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    mods = dsf_modules(model)
    assert len(mods) == 14 and all(isinstance(m, DSFLinear) for m in mods.values())
    assert all(not t.is_meta for t in model.state_dict().values())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    direct, tok = load_model(ckpt)
    ids = tok("Lady Russell", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, direct(ids).logits, rtol=0, atol=0)
    from dsf_runtime.kernels import choose_backend

    for m in mods.values():  # the same backend auto-selection as the direct path, never the dense reference
        assert m.backend_name == choose_backend(m.fmt, "cpu", tensors=m.L.stored()).name != "dense-ref"


def test_registration_is_idempotent():
    assert dsf_runtime.hf.register() is True


def _corrupt(ckpt, tmp_path, edit):
    dst = tmp_path / "bad"
    shutil.copytree(ckpt, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_from_pretrained_rejects_corrupt_factors(ckpt, tmp_path):
    key = next(k for k in load_file(ckpt / "model.safetensors") if k.endswith(".R.values"))

    def nan(t):
        t[key] = t[key].clone()
        t[key][0] = float("nan")

    with pytest.raises(Exception, match="NaN"):
        AutoModelForCausalLM.from_pretrained(_corrupt(ckpt, tmp_path, nan))


def test_from_pretrained_rejects_bad_metadata(ckpt, tmp_path):
    dst = tmp_path / "meta"
    shutil.copytree(ckpt, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"]["version"] = 7
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="version"):
        AutoModelForCausalLM.from_pretrained(dst)
