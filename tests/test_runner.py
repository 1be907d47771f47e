"""The serving runner's forward equals the transformers forward, for every supported architecture."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_llama
from dsf_runtime.errors import UnsupportedModelError
from dsf_runtime.runner import ModelRunner


def _reference(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


@pytest.mark.parametrize(
    "model_type,overrides",
    [
        ("llama", {}),
        ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
        ("qwen2", {}),  # q/k/v biases
        ("mistral", {"sliding_window": 64}),
    ],
)
def test_prefill_and_batched_decode_match_transformers(model_type, overrides):
    model = make_tiny_llama(300, model_type=model_type, **overrides)
    runner = ModelRunner(model, slots=3, max_len=48)
    prompts = [list(range(3, 20)), [7], list(range(100, 131))]  # 17, 1 and 31 tokens
    for slot, ids in enumerate(prompts):
        torch.testing.assert_close(runner.prefill(slot, ids), _reference(model, ids), rtol=1e-4, atol=1e-4)
    nxt = [5, 6, 7]
    logits = runner.decode(nxt, [len(p) for p in prompts])
    for row, ids, tok in zip(logits, prompts, nxt):
        torch.testing.assert_close(row, _reference(model, ids + [tok]), rtol=1e-4, atol=1e-4)
    # slot 2 moves into slot 0 (what the engine does when slot 0's request ends) and keeps decoding
    runner.move(2, 0, len(prompts[2]) + 1)
    row = runner.decode([9], [len(prompts[2]) + 1])[0]
    torch.testing.assert_close(row, _reference(model, prompts[2] + [7, 9]), rtol=1e-4, atol=1e-4)


def test_context_limits_are_enforced():
    model = make_tiny_llama(300, max_position_embeddings=40)
    runner = ModelRunner(model, slots=1, max_len=4096)
    assert runner.max_len == 40  # never beyond what the model supports
    with pytest.raises(ValueError, match="does not fit"):
        runner.prefill(0, list(range(41)))
    with pytest.raises(ValueError, match="past the context"):
        runner.decode([1], [40])
    with pytest.raises(ValueError):
        runner.decode([1, 2], [0, 1])  # more tokens than slots


def test_sliding_window_caps_the_context():
    model = make_tiny_llama(300, model_type="mistral", sliding_window=32)
    assert ModelRunner(model, slots=1).max_len == 32


def test_unsupported_architecture_is_a_clear_error():
    model = make_tiny_llama(300)
    model.config.model_type = "gpt2"
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        ModelRunner(model, slots=1)


@pytest.mark.parametrize(
    "one_matrix",
    [None, lambda name: True, lambda name: name.endswith(("k_proj", "o_proj", "up_proj"))],
    ids=["pairs", "pruned", "mixed"],
)
def test_dsf_blocks_run_as_one_op_each_and_match_transformers(one_matrix, fp32_activations):
    """A DSF model's MLP blocks and decode-step attention inputs (RMSNorm, SiLU, rotary,
    cache writes; cpu-bitmap pairs, fp32) take the fused ops; the runner still equals the transformers forward of the same modules, also after
    a move drops the bound operands mid-run (the block falls back to the modules for
    that call and binds again). One-matrix (pruned) layers take the same ops, alone or
    mixed with factor pairs."""
    from dsf_runtime.kernels import BACKENDS
    from tests_support import tiny_dsf_llama

    if not BACKENDS["cpu-bitmap"].available():
        pytest.skip("CPU kernel could not be built here")
    model = tiny_dsf_llama(one_matrix=one_matrix)
    runner = ModelRunner(model, slots=2, max_len=48)
    assert {block.__name__ for block in runner.mlp_blocks} == {"fused"}
    assert {inputs.__name__ for inputs in runner.attn_inputs} == {"fused"}
    assert all(step is not None for step in runner.decode_layers)
    prompts = [list(range(3, 20)), list(range(40, 49))]
    for slot, ids in enumerate(prompts):
        torch.testing.assert_close(runner.prefill(slot, ids), _reference(model, ids), rtol=1e-4, atol=1e-4)
    logits = runner.decode([5, 6], [len(p) for p in prompts])
    for row, ids, tok in zip(logits, prompts, [5, 6]):
        torch.testing.assert_close(row, _reference(model, ids + [tok]), rtol=1e-4, atol=1e-4)
    model.float()  # every DSFLinear drops its prepared operands
    row = runner.decode([7], [len(prompts[0]) + 1])[0]
    torch.testing.assert_close(row, _reference(model, prompts[0] + [5, 7]), rtol=1e-4, atol=1e-4)
    for other in (tiny_dsf_llama().to(torch.bfloat16), make_tiny_llama(300)):
        runner = ModelRunner(other, slots=1)
        assert (runner.mlp_blocks[0].__name__, runner.attn_inputs[0].__name__) == ("modules", "modules")
        assert runner.decode_layers == [None] * len(runner.layers)


@pytest.mark.parametrize("grid", ["q8", "bf16"])
def test_output_layer_read_in_a_narrow_form_gives_the_same_logits(grid, monkeypatch):
    """An output layer whose weights are Q8_0-dequantized (the embedded model's) or bf16
    numbers is read packed, and the logits equal the fp32 read's bit for bit."""
    from dsf_runtime.kernels import cpu_bitmap

    if not cpu_bitmap.build():
        pytest.skip("CPU kernel could not be built here")
    model = make_tiny_llama(300, hidden_size=64)
    w = model.lm_head.weight.data
    if grid == "q8":
        blocks = w.view(w.shape[0], -1, 32)
        scale = (blocks.abs().amax(2, keepdim=True) / 127).half().float()
        w.copy_(((blocks / scale).round().clamp(-127, 127) * scale).view_as(w))
    else:
        w.copy_(w.bfloat16().float())
    packed = ModelRunner(model, slots=2, max_len=32)
    monkeypatch.setenv("DSF_OUTPUT_PACKING", "off")
    plain = ModelRunner(model, slots=2, max_len=32)
    assert (packed.lm_head.form, plain.lm_head.form) == ({"q8": "int8 x scale/32", "bf16": "bf16"}[grid], "fp32")
    for runner in (packed, plain):
        runner.prefill(0, list(range(3, 12)))
        runner.prefill(1, [4, 5])
    assert torch.equal(packed.decode([7, 8], [9, 2]), plain.decode([7, 8], [9, 2]))
    torch.testing.assert_close(packed.prefill(0, [3, 4, 5]), _reference(model, [3, 4, 5]), rtol=1e-4, atol=1e-4)
