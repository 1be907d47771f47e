"""dsf pack: repacking between formats and packing external factor pairs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from dsf_runtime.checkpoint import load_model, read_quant_config
from dsf_runtime.cli import main
from dsf_runtime.converters.pipeline import make_job, run_compress
from dsf_runtime.errors import CheckpointError
from dsf_runtime.patch import dsf_modules


@pytest.fixture(scope="module")
def ckpt(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pack") / "ckpt"
    path, _ = run_compress(make_job(str(tiny_model_dir), out, nsamples=4, seqlen=32, progress=False))
    return path


def logits(path, text="Sir Walter Elliot"):
    model, tok = load_model(path)
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("fmt,extra", [("csr", []), ("bsr", ["--block", "8"]), ("bitmap", [])])
def test_repack_is_lossless(ckpt, tmp_path, fmt, extra, fp32_activations):
    out = tmp_path / fmt
    assert main(["pack", str(ckpt), str(out), "--format", fmt, *extra]) == 0
    _, quant = read_quant_config(out)
    assert quant.format == fmt
    a, _ = load_model(ckpt)
    b, _ = load_model(out)
    for name, m in dsf_modules(a).items():
        n = dsf_modules(b)[name]
        assert torch.equal(m.L.to_dense(), n.L.to_dense()) and torch.equal(m.R.to_dense(), n.R.to_dense())
    torch.testing.assert_close(logits(out), logits(ckpt), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["bitmap", "csr"])
def test_repack_to_int8_values(ckpt, tmp_path, fmt):
    """int8 values keep every mask, cost one byte per nonzero, and change the model's
    logits only by the rounding of the values (max |row| / 254 per value)."""
    out = tmp_path / f"{fmt}-int8"
    assert main(["pack", str(ckpt), str(out), "--format", fmt, "--value-dtype", "int8"]) == 0
    _, quant = read_quant_config(out)
    assert quant.value_dtype == "int8"
    a, _ = load_model(ckpt)
    b, _ = load_model(out)
    for name, m in dsf_modules(a).items():
        n = dsf_modules(b)[name]
        for fa, fb in ((m.L, n.L), (m.R, n.R)):
            da, db = fa.to_dense().float(), fb.to_dense().float()
            assert not bool(((db != 0) & (da == 0)).any())
            step = da.abs().amax(dim=1, keepdim=True) / 127
            assert bool(((da - db).abs() <= step / 2 + 1e-6).all())
            assert fb.values.dtype == torch.int8 and fb.values.numel() == fa.values.numel()
    ref, got = logits(ckpt), logits(out)
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < 0.05, rel
    assert main(["pack", str(ckpt), str(tmp_path / "bsr"), "--format", "bsr", "--value-dtype", "int8"]) == 2


def _export(ckpt, path, transposed=False, single=False):
    model, _ = load_model(ckpt)
    tensors = {}
    for name, m in dsf_modules(model).items():
        L, R = m.L.to_dense().float(), m.R.to_dense().float()
        if single:
            tensors[f"{name}.weight"] = (L @ R).contiguous()
        elif transposed:
            tensors[f"{name}.L"], tensors[f"{name}.R"] = L.t().contiguous(), R.t().contiguous()
        else:
            tensors[f"{name}.L"], tensors[f"{name}.R"] = L, R
    save_file(tensors, path)


@pytest.mark.parametrize("transposed", [False, True])
def test_external_factor_pairs(ckpt, tiny_model_dir, tmp_path, transposed):
    src = tmp_path / "factors.safetensors"
    _export(ckpt, src, transposed=transposed)
    out = tmp_path / "ext"
    args = ["pack", str(src), str(out), "--base", str(tiny_model_dir)] + (["--transposed"] if transposed else [])
    assert main(args) == 0
    _, quant = read_quant_config(out)
    assert quant.method == "external" and 0.49 < quant.sparsity <= 0.51
    torch.testing.assert_close(logits(out), logits(ckpt), rtol=1e-4, atol=1e-4)


def test_external_single_matrices(ckpt, tiny_model_dir, tmp_path):
    src = tmp_path / "pruned.safetensors"
    _export(ckpt, src, single=True)
    out = tmp_path / "single"
    assert main(["pack", str(src), str(out), "--base", str(tiny_model_dir), "--format", "csr"]) == 0
    model, _ = load_model(out)
    assert all(m.R is None for m in dsf_modules(model).values())


def test_external_errors(ckpt, tiny_model_dir, tmp_path, capsys):
    from dsf_runtime.converters.pack import pack_external

    src = tmp_path / "t.safetensors"
    _export(ckpt, src, transposed=True)
    with pytest.raises(CheckpointError, match="try --transposed"):
        pack_external(src, str(tiny_model_dir), tmp_path / "o1")
    save_file({"model.layers.0.mlp.up_proj.L": torch.ones(3, 3)}, tmp_path / "half.safetensors")
    with pytest.raises(CheckpointError, match="need both L and R"):
        pack_external(tmp_path / "half.safetensors", str(tiny_model_dir), tmp_path / "o2")
    save_file({"model.layers.0.mlp.nothing.weight": torch.ones(3, 3)}, tmp_path / "ghost.safetensors")
    with pytest.raises(CheckpointError, match="no module"):
        pack_external(tmp_path / "ghost.safetensors", str(tiny_model_dir), tmp_path / "o3")
    save_file({"weird": torch.ones(3)}, tmp_path / "weird.safetensors")
    with pytest.raises(CheckpointError, match="is not named"):
        pack_external(tmp_path / "weird.safetensors", str(tiny_model_dir), tmp_path / "o4")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="not a readable"):
        pack_external(tmp_path / "junk.safetensors", str(tiny_model_dir), tmp_path / "o5")
    assert main(["pack", str(src), str(tmp_path / "o6")]) == 2
    assert "needs --base" in capsys.readouterr().err
    assert main(["pack", str(ckpt), str(tmp_path / "o7"), "--format", "zip"]) == 2
    assert "unknown format" in capsys.readouterr().err
