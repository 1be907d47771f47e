"""Shared fixtures: a tiny LLaMA with random weights and a small BPE tokenizer,
built offline from a config (no hub)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    # Triton kernels run in Triton's CPU interpreter (set before triton is first imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def make_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from dsf_runtime.data import corpus_file

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = corpus_file("persuasion").read_text(encoding="utf-8")[:200_000]
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_tiny_llama(vocab_size: int, seed: int = 0, model_type: str = "llama", **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init: larger weights so layers matter
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny LLaMA model directory (config.json + safetensors + tokenizer)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny_llama(len(tiny_tokenizer))
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def parts(tiny_tokenizer):
    """A tiny random LLaMA and the tiny tokenizer with a chat template (the serving tests)."""
    from tests_support import chat_tokenizer

    return make_tiny_llama(384), chat_tokenizer(tiny_tokenizer)


@pytest.fixture
def ct_copy(tmp_path):
    """A writable copy of the sparse-bitmask bf16 compressed-tensors fixture."""
    import shutil

    from tests_support import CT_FIXTURES

    dest = tmp_path / "ct"
    shutil.copytree(CT_FIXTURES / "sparse-bitmask-bf16", dest)
    return dest


@pytest.fixture
def fp32_activations(monkeypatch):
    """Keep fp32 activations in every CPU kernel path. On CPUs with AVX512_BF16 or AMX, bf16
    factors take fp32 x rounded to bf16 (the dot path from batch 2, the pair and tile paths
    from 16), within 2^-8 of the product (tests/kernels checks them against that
    reference); tests that compare a model's logits with the dense fp32 product at tighter
    tolerances turn that off."""
    monkeypatch.setenv("DSF_ROUND_X", "off")
    monkeypatch.setenv("DSF_AMX", "off")
