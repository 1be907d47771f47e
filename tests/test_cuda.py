"""The CUDA path end to end (skipped without a GPU): compress on the GPU, load onto
it, run the Triton and cuSPARSE backends, and match the CPU reference."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import dsf_runtime  # noqa: F401  (registers the transformers quantizer)
from dsf_runtime.checkpoint import backend_summary, load_model
from dsf_runtime.converters.pipeline import make_job, run_compress
from dsf_runtime.patch import dsf_modules

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TEXT = "It was the best of times, it was the worst of times"


@pytest.fixture(scope="module")
def cuda_compressed(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda") / "tiny-dsf"
    job = make_job(
        str(tiny_model_dir), out, sparsity=0.5, preset_name="fast", nsamples=8, seqlen=64, progress=False, device="cuda"
    )
    path, result = run_compress(job)
    return path, result


def _logits(model, tokenizer, device):
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"].to(device)
    with torch.no_grad():
        return model(ids).logits.float().cpu()


def test_compression_on_cuda_is_within_budget(cuda_compressed):
    _, result = cuda_compressed
    assert len(result.reports) == 14
    assert all(r.rel_error < 0.2 and r.seconds > 0 for r in result.reports)


@pytest.mark.parametrize("backend", ["auto", "triton-bitmap", "torch-csr", "cupy-csr", "cupy-bitmap"])
def test_cuda_backends_match_cpu_reference(cuda_compressed, backend):
    from dsf_runtime.kernels import cupy_common

    if backend.startswith("cupy") and cupy_common.unavailable_reason():
        pytest.skip(cupy_common.unavailable_reason())
    path, _ = cuda_compressed
    ref_model, tokenizer = load_model(path, backend="dense-ref")
    ref = _logits(ref_model, tokenizer, "cpu")
    model, _ = load_model(path, device="cuda", backend=backend)
    out = _logits(model, tokenizer, "cuda")
    summary = backend_summary(model)
    assert ("triton-bitmap" if backend == "auto" else backend) in summary
    assert all(m.L.bitmap.is_cuda for m in dsf_modules(model).values())
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)


def test_fp16_model_on_cuda(cuda_compressed):
    path, _ = cuda_compressed
    ref_model, tokenizer = load_model(path, backend="dense-ref")
    ref = _logits(ref_model, tokenizer, "cpu")
    model, _ = load_model(path, device="cuda", dtype=torch.float16)
    out = _logits(model, tokenizer, "cuda")
    assert "triton-bitmap" in backend_summary(model)
    # fp16 activations through 2 layers: ~1e-3 relative per op
    assert (out - ref).norm() <= 2e-2 * ref.norm()


def test_from_pretrained_onto_cuda(cuda_compressed):
    path, _ = cuda_compressed
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cuda")
    assert len(dsf_modules(model)) == 14
    ref_model, tokenizer = load_model(path, backend="dense-ref")
    torch.testing.assert_close(
        _logits(model, tokenizer, "cuda"), _logits(ref_model, tokenizer, "cpu"), rtol=1e-3, atol=1e-3
    )


def test_cli_generate_on_cuda(cuda_compressed, capsys):
    from dsf_runtime.cli import main

    path, _ = cuda_compressed
    assert main(["generate", str(path), "--device", "cuda", "--max-tokens", "8", "--prompt", "Anne"]) in (0, None)
    assert "triton-bitmap" in capsys.readouterr().err  # the backend line goes to stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graph_decode_matches_eager(cuda_compressed, dtype):
    """The runner's decode replayed from CUDA graphs gives the eager decode's logits, over
    batch and span buckets and a slot move."""
    from dsf_runtime.runner import ModelRunner

    path, _ = cuda_compressed
    model, _ = load_model(path, device="cuda", dtype=dtype)
    prompts = [list(range(3, 20)), [7], list(range(100, 160))]
    results = []
    for graphs in (False, True):
        runner = ModelRunner(model, slots=4, max_len=160, cuda_graphs=graphs)
        for slot, ids in enumerate(prompts):
            runner.prefill(slot, ids)
        lengths, out = [len(p) for p in prompts], []
        for step in range(8):
            out.append(runner.decode([5 + step] * 3, lengths).cpu())
            lengths = [n + 1 for n in lengths]
        runner.move(2, 0, lengths[2])
        out.append(runner.decode([9], [lengths[2]]).cpu())
        if graphs:
            assert runner.graphs.failed is None and len(runner.graphs.graphs) == 3
        results.append(out)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
