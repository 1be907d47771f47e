"""Writes the compressed-tensors fixtures in tests/fixtures/compressed_tensors/ with the
compressed-tensors library itself, so that our reader is tested against files the real
compressor made, not against our idea of its layout.

compressed-tensors removed its sparse compressors after 0.14; that version needs
transformers < 5, so it runs in a throwaway environment:

    python -m venv /tmp/ctenv
    /tmp/ctenv/bin/pip install torch==2.13.0 "transformers<5" compressed-tensors==0.14.0.1
    /tmp/ctenv/bin/python scripts/make_ct_fixtures.py

Each fixture is a tiny random LLaMA (64-wide, 2 layers), pruned (unstructured 50% by
magnitude for sparse-bitmask, 2:4 for sparse-24-bitmask), compressed and saved as
config.json + model.safetensors, with reference.safetensors: token ids and the logits of
the pruned dense model in float32, computed here by transformers.

    /tmp/ctenv/bin/python scripts/make_ct_fixtures.py --check-export CT_DIR DENSE_DIR

checks instead that compressed-tensors itself decompresses a `dsf export` result to the
weights of DENSE_DIR (the pruned model that `dsf convert` started from), bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from compressed_tensors import __version__ as ct_version
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.config import CompressionFormat, SparsityCompressionConfig
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "compressed_tensors"
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(seed: int, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.to(dtype).eval()


def prune(weight: torch.Tensor, structure: str) -> torch.Tensor:
    """Magnitude pruning: half of each row (unstructured) or 2 of every 4 (2:4)."""
    w = weight.float()
    if structure == "2:4":
        groups = w.abs().reshape(w.shape[0], -1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
        return (w * keep.reshape(w.shape)).to(weight.dtype)
    k = w.shape[1] // 2
    cut = w.abs().kthvalue(k, dim=1, keepdim=True).values
    return (w * (w.abs() > cut)).to(weight.dtype)


def write(name: str, fmt: str, structure: str, dtype: torch.dtype, ignore: list[str]) -> None:
    model = tiny_llama(len(name), dtype)
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if module_name.rsplit(".", 1)[-1] in LINEARS and module_name not in ignore:
                module.weight.copy_(prune(module.weight, structure))
    ids = torch.randint(3, 384, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model.float()(ids).logits
    model = model.to(dtype)
    model.config.torch_dtype = dtype
    sparsity = SparsityCompressionConfig.load_from_registry(
        fmt, targets=["Linear"], ignore=["lm_head", *ignore], sparsity_structure=structure, global_sparsity=0.5
    )
    compressor = ModelCompressor(sparsity_config=sparsity)
    state = compressor.compress(model)
    out = OUT / name
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(out)
    compressor.update_config(str(out))
    save_file({"input_ids": ids, "logits": logits}, out / "reference.safetensors")
    (out / "GENERATED.json").write_text(
        json.dumps({"by": "scripts/make_ct_fixtures.py", "compressed_tensors": ct_version})
    )
    print(out, sorted(state)[:6])


def check_export(ct_dir: str, dense_dir: str) -> None:
    from safetensors.torch import load_file

    compressor = ModelCompressor.from_pretrained(ct_dir)
    dense = load_file(Path(dense_dir) / "model.safetensors")
    count = 0
    for name, weight in compressor.sparsity_compressor.decompress(str(Path(ct_dir) / "model.safetensors")):
        if not torch.equal(weight, dense[name]):
            raise SystemExit(f"{name} differs after decompression")
        count += 1
    print(f"{type(compressor.sparsity_compressor).__name__}: {count} tensors bit-identical to {dense_dir}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--check-export"]:
        check_export(sys.argv[2], sys.argv[3])
        raise SystemExit(0)
    write(
        "sparse-bitmask-bf16",
        CompressionFormat.sparse_bitmask.value,
        "unstructured",
        torch.bfloat16,
        ["model.layers.1.mlp.down_proj"],
    )
    write("sparse-bitmask-fp16", CompressionFormat.sparse_bitmask.value, "unstructured", torch.float16, [])
    write("sparse-24-bitmask-bf16", CompressionFormat.sparse_24_bitmask.value, "2:4", torch.bfloat16, [])
