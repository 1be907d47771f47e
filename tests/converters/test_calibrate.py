"""The sequential driver: every method through the same path, resumable runs."""

from __future__ import annotations

import pytest
import torch

from dsf_runtime.checkpoint import load_model
from dsf_runtime.converters.calibrate import compress_sequential
from dsf_runtime.converters.config import DSFConfig
from dsf_runtime.converters.methods import make_method
from dsf_runtime.converters.pipeline import make_job, run_compress
from dsf_runtime.errors import ConfigError
from dsf_runtime.patch import dsf_modules


def windows(vocab: int, n: int = 4, seqlen: int = 32):
    return torch.randint(3, vocab, (n, seqlen), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude", "sparsegpt:2:4"])
def test_baselines_pack_and_load_as_single_matrices(method, tiny_model_dir, tmp_path):
    path, result = run_compress(
        make_job(str(tiny_model_dir), tmp_path / "ck", method=method, nsamples=4, seqlen=32, progress=False)
    )
    model, tokenizer = load_model(path)
    mods = dsf_modules(model)
    assert len(mods) == 14
    for name, m in mods.items():
        assert m.R is None and m.rank is None
        assert m.L.nnz <= int(0.5 * m.out_features * m.in_features)
    ref = {r.name: r for r in result.reports}
    assert all(ref[name].nnz_right == 0 for name in mods)
    ids = tokenizer("Mr. Darcy", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_resume_after_interruption(tiny_model_dir, tmp_path, monkeypatch):
    from dsf_runtime.converters import calibrate

    job = make_job(str(tiny_model_dir), tmp_path / "ck", nsamples=4, seqlen=32, progress=False)
    calls = []
    real = calibrate._compress_layer

    def dying(*args, **kwargs):
        if calls:  # the second layer "crashes"
            raise KeyboardInterrupt
        calls.append(args[4])
        return real(*args, **kwargs)

    monkeypatch.setattr(calibrate, "_compress_layer", dying)
    with pytest.raises(KeyboardInterrupt):
        run_compress(job)
    assert (job.work_dir / "layer_0000.safetensors").exists()
    assert not job.out_dir.exists()

    monkeypatch.setattr(calibrate, "_compress_layer", real)
    path, result = run_compress(job)
    assert result.resumed_layers == 1
    assert not job.work_dir.exists()  # cleaned up after the checkpoint is written

    fresh_job = make_job(str(tiny_model_dir), tmp_path / "fresh", nsamples=4, seqlen=32, progress=False)
    _, fresh = run_compress(fresh_job)
    resumed = {n: (L, R) for n, (L, R) in result.factors.items()}
    for name, (L, R) in fresh.factors.items():
        # Resumed layer 0 was stored in fp32 CSR: identical to the fresh run's factors.
        torch.testing.assert_close(resumed[name][0], L, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(resumed[name][1], R, rtol=1e-4, atol=1e-5)
    assert load_model(path)[0] is not None


def test_resume_refuses_other_settings(tiny_model_dir, tmp_path):
    job = make_job(str(tiny_model_dir), tmp_path / "ck", nsamples=4, seqlen=32, progress=False)
    job.work_dir.mkdir(parents=True)
    (job.work_dir / "job.json").write_text('{"model": "something else"}')
    with pytest.raises(ConfigError, match="other settings"):
        run_compress(job)


def test_nan_in_factorization_is_reported(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from dsf_runtime.converters.methods import Factors
    from dsf_runtime.errors import FactorizationError

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)

    def broken(W, H):
        L = W.clone()
        L[0, 0] = float("nan")
        return Factors(L, None)

    with pytest.raises(FactorizationError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        compress_sequential(model, windows(model.config.vocab_size), broken, progress=False)


def test_driver_reports_per_linear(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    result = compress_sequential(
        model, windows(model.config.vocab_size), make_method("dsf", 0.5, DSFConfig(outer_iters=3)), progress=False
    )
    assert len(result.reports) == 14
    for r in result.reports:
        assert r.info["error_after_finalize"] <= r.info["error_before_finalize"] * 1.001
        assert r.rel_error == pytest.approx(r.info["error_after_finalize"], rel=1e-3, abs=1e-6)
        assert r.seconds >= 0


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sigkill_then_corrupt_partial_layer_then_resume(tiny_model_dir, tmp_path, caplog):
    """A compress killed with SIGKILL (after its first layer was saved) resumes; a truncated saved
    layer is computed again with a warning; a temporary checkpoint directory left by a killed
    writer is removed; the result equals an uninterrupted run's."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "ck"
    args = ["compress", str(tiny_model_dir), str(out), "--sparsity", "0.5", "--nsamples", "4", "--seqlen", "32"]
    work = out.with_name(f".{out.name}.partial")
    # slow the second layer down so the kill lands after the first layer is saved
    code = (
        "import sys, time; from dsf_runtime.converters import calibrate as c; real = c._compress_layer\n"
        "def slow(*a, **k):\n    if a[6].endswith('.1'): time.sleep(60)\n    return real(*a, **k)\n"
        "c._compress_layer = slow\nfrom dsf_runtime.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stderr=subprocess.DEVNULL)
    end = time.monotonic() + 120
    while not (work / "layer_0000.json").exists():
        assert proc.poll() is None and time.monotonic() < end, "compress ended before its first layer was saved"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    layer = work / "layer_0000.safetensors"
    layer.write_bytes(layer.read_bytes()[: layer.stat().st_size // 2])
    stale = out.with_name(f".{out.name}.tmp-{_dead_pid()}")
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half-written")

    from dsf_runtime.cli import main

    with caplog.at_level("WARNING"):
        assert main(args) == 0
    assert "computing the layer again" in caplog.text and not stale.exists() and not work.exists()
    fresh = tmp_path / "fresh"
    assert main([*args[:2], str(fresh), *args[3:]]) == 0
    from safetensors.torch import load_file

    a, b = load_file(out / "model.safetensors"), load_file(fresh / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
