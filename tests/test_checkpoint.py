"""Checkpoint save/load and its validation: every corruption is a CheckpointError."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsf_runtime.checkpoint import is_dsf_checkpoint, load_model, read_quant_config
from dsf_runtime.converters.pipeline import make_job, run_compress
from dsf_runtime.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def ckpt(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tiny-dsf"
    path, _ = run_compress(make_job(str(tiny_model_dir), out, nsamples=4, seqlen=32, progress=False, fmt="csr"))
    return path


@pytest.fixture
def copy(ckpt, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(ckpt, dst)
    return dst


def test_layout_and_metadata(ckpt):
    assert is_dsf_checkpoint(ckpt)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (ckpt / name).is_file()
    assert not list(ckpt.glob("*.bin")) and not list(ckpt.glob("*.pt"))  # no pickle
    _, quant = read_quant_config(ckpt)
    assert quant.quant_method == "dsf" and quant.version == 1 and quant.format == "csr"
    assert quant.factorization["outer_iters"] == 12
    tensors = load_file(ckpt / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.L.col_indices" in tensors
    assert "model.layers.0.self_attn.q_proj.weight" not in tensors  # no dense W stored
    assert tensors["model.layers.0.mlp.up_proj.R.values"].dtype == torch.bfloat16  # the default value dtype


def test_refuses_to_overwrite_user_directory(tiny_model_dir, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        make_job(str(tiny_model_dir), target)
    with pytest.raises(ConfigError, match="not empty"):
        make_job(str(tiny_model_dir), target, overwrite=True)
    assert (target / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_file(copy, missing):
    (copy / missing).unlink()
    if missing == "tokenizer.json":
        (copy / "tokenizer_config.json").unlink()
    with pytest.raises(CheckpointError, match="missing|no tokenizer"):
        load_model(copy)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(tmp_path / "nope")


def _edit_config(path, fn):
    config = json.loads((path / "config.json").read_text())
    fn(config)
    (path / "config.json").write_text(json.dumps(config))


CONFIG_EDITS = {
    "future version": (lambda c: c["quantization_config"].update(version=99), "version"),
    "unknown format": (lambda c: c["quantization_config"].update(format="zip"), "format"),
    "not dsf": (lambda c: c.pop("quantization_config"), "not a DSF checkpoint"),
    "wrong module": (
        lambda c: c["quantization_config"]["modules"].update(
            {"model.layers.9.mlp.up_proj": c["quantization_config"]["modules"]["model.layers.0.mlp.up_proj"]}
        ),
        "does not have",
    ),
    "wrong nnz": (
        lambda c: c["quantization_config"]["modules"]["model.layers.0.mlp.up_proj"].update(nnz_left=3),
        "stored",
    ),
    "huge nnz": (
        lambda c: c["quantization_config"]["modules"]["model.layers.0.mlp.up_proj"].update(nnz_left=10**12),
        "larger than",
    ),
    "wrong shape": (
        lambda c: c["quantization_config"]["modules"]["model.layers.1.self_attn.k_proj"].update(in_features=999),
        "does not match",
    ),
    "unsupported arch": (lambda c: c.update(model_type="gpt2"), "not supported"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_EDITS))
def test_config_corruption(copy, case):
    edit, message = CONFIG_EDITS[case]
    _edit_config(copy, edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(copy)


def test_invalid_json(copy):
    (copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(copy)


def _edit_tensors(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors")


def _set(key, value_fn):
    def edit(t):
        t[key] = value_fn(t[key].clone())

    return edit


def _assign(key, index, value):
    def fn(x):
        x[index] = value
        return x

    return _set(key, fn)


PREFIX = "model.layers.1.mlp.down_proj.R"
TENSOR_EDITS = {
    "col index out of range": (_assign(f"{PREFIX}.col_indices", 0, 30000), "out of range"),
    "negative col index": (_assign(f"{PREFIX}.col_indices", 5, -3), "out of range"),
    "offsets not monotone": (_assign(f"{PREFIX}.crow_indices", 4, 10**5), "monotone|end at nnz"),
    "NaN factor value": (_assign(f"{PREFIX}.values", 0, float("nan")), "NaN"),
    "Inf dense weight": (_assign("model.norm.weight", 0, float("inf")), "NaN or Inf"),
    "dtype flipped": (_set(f"{PREFIX}.values", lambda x: x.float()), "expected BF16"),
    "index dtype flipped": (_set(f"{PREFIX}.col_indices", lambda x: x.long()), "expected I16"),
    "shape changed": (_set(f"{PREFIX}.values", lambda x: x[:-1]), "expected"),
    "tensor removed": (lambda t: t.pop(f"{PREFIX}.values"), "lacks"),
    "tensor added": (lambda t: t.update({"evil": torch.zeros(3)}), "unexpected"),
}


@pytest.mark.parametrize("case", sorted(TENSOR_EDITS))
def test_tensor_corruption(copy, case):
    edit, message = TENSOR_EDITS[case]
    _edit_tensors(copy, edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(copy)


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.5, 0.999])
def test_truncated_weights(copy, keep):
    f = copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_model(copy)


def test_header_declares_enormous_tensor(copy):
    """A header claiming a huge tensor must fail on the file-size check, not allocate."""
    f = copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    key = f"{PREFIX}.values"
    start, _ = header[key]["data_offsets"]
    header[key]["shape"] = [2**40]
    header[key]["data_offsets"] = [start, start + 2 * 2**40]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    f.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])
    with pytest.raises(CheckpointError):
        load_model(copy)


@pytest.fixture(scope="module")
def sharded(ckpt, tmp_path_factory):
    from dsf_runtime.checkpoint import save_checkpoint

    model, tok = load_model(ckpt)
    _, quant = read_quant_config(ckpt)
    out = tmp_path_factory.mktemp("sharded") / "ck"
    save_checkpoint(model, tok, out, quant, max_shard_bytes=64 * 1024)
    return out


def test_sharded_checkpoint_round_trip(sharded, ckpt):
    from transformers import AutoModelForCausalLM

    shards = sorted(sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (sharded / "model.safetensors.index.json").is_file()
    assert not (sharded / "model.safetensors").exists()
    a, tok = load_model(sharded)
    b, _ = load_model(ckpt)
    c = AutoModelForCausalLM.from_pretrained(sharded)
    ids = tok("Mrs. Smith", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
        assert torch.equal(c(ids).logits, b(ids).logits)


def test_sharded_checkpoint_errors(sharded, tmp_path):
    broken = tmp_path / "b"
    shutil.copytree(sharded, broken)
    next(iter(sorted(broken.glob("model-*.safetensors")))).unlink()
    with pytest.raises(CheckpointError, match="missing model-00001"):
        load_model(broken)
    evil = tmp_path / "e"
    shutil.copytree(sharded, evil)
    index = json.loads((evil / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../etc/passwd"
    (evil / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a plain file name"):
        load_model(evil)
    (evil / "model.safetensors.index.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        load_model(evil)


def test_load_in_another_dtype_keeps_factors_and_ties(tmp_path, tiny_model_dir):
    """load_model(dtype=fp16) of an fp32 checkpoint: dense parts cast, factors as stored."""
    from dsf_runtime.converters.pipeline import make_job, run_compress
    from dsf_runtime.patch import dsf_modules

    path, _ = run_compress(
        make_job(
            str(tiny_model_dir),
            tmp_path / "c",
            preset_name="fast",
            nsamples=4,
            seqlen=32,
            progress=False,
            dsf_overrides={"outer_iters": 2},
        )
    )
    ref, tok = load_model(path)
    half, _ = load_model(path, dtype=torch.float16)
    assert half.model.embed_tokens.weight.dtype == torch.float16 and half.lm_head.weight.dtype == torch.float16
    for name, m in dsf_modules(half).items():
        assert m.L.values.dtype == dsf_modules(ref)[name].L.values.dtype
    ids = tok("Anne Elliot walked", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = ref(ids).logits, half(ids).logits.float()
    assert (a - b).norm() <= 2e-2 * a.norm()


def test_loads_without_accelerate_and_keeps_computed_buffers(ckpt, monkeypatch):
    """The skeleton puts parameters on the meta device by itself (accelerate is not a
    dependency); buffers computed at construction, like the rotary table, stay real."""
    import sys

    from transformers import AutoConfig, AutoModelForCausalLM

    monkeypatch.setitem(sys.modules, "accelerate", None)  # any import of it now fails
    model, _ = load_model(ckpt, with_tokenizer=False)
    assert not [n for n, p in model.named_parameters() if p.device.type == "meta"]
    config = AutoConfig.from_pretrained(ckpt)
    reference = AutoModelForCausalLM.from_config(config).model.rotary_emb.inv_freq
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"
    assert torch.equal(model.model.rotary_emb.inv_freq, reference)
    assert torch.nn.Module.register_parameter.__name__ == "register_parameter"  # the patch is undone


def test_tensors_are_mapped_copy_on_write(copy):
    """Loading maps the weight file (no copy); writing to a loaded tensor never reaches the file."""
    from dsf_runtime.patch import dsf_modules

    before = (copy / "model.safetensors").read_bytes()
    model, _ = load_model(copy, with_tokenizer=False)
    x = torch.randn(2, model.config.hidden_size)
    module = next(iter(dsf_modules(model).values()))
    y = module(x)
    maps = Path("/proc/self/maps")
    if maps.exists():  # Linux: the factor's values live in a mapping of the weight file
        ptr = module.L.values.data_ptr()
        spans = [line.split() for line in maps.read_text().splitlines() if line.endswith("model.safetensors")]
        assert any(int(s[0].split("-")[0], 16) <= ptr < int(s[0].split("-")[1], 16) for s in spans)
    for t in model.state_dict().values():
        if t.is_floating_point():
            t.mul_(0)  # private pages: the file must not change
    assert (copy / "model.safetensors").read_bytes() == before
    fresh, _ = load_model(copy, with_tokenizer=False)
    torch.testing.assert_close(next(iter(dsf_modules(fresh).values()))(x), y)


def _raw_safetensors(path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    """Write a safetensors file by hand, tensors in the given order, no alignment padding."""
    header, data = {}, b""
    for key, (dtype, shape, raw) in tensors.items():
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def test_misaligned_tensors_are_copied(tmp_path):
    """A tensor whose offset is not a multiple of its element size cannot be a view of the
    map; it is read by copy, with the same values."""
    from dsf_runtime.checkpoint import _map_file, _read_tensors

    a = torch.tensor([1, -2, 3], dtype=torch.int8)
    b = torch.tensor([7, -70000], dtype=torch.int32)
    _raw_safetensors(
        tmp_path / "model.safetensors", {"a": ("I8", [3], a.numpy().tobytes()), "b": ("I32", [2], b.numpy().tobytes())}
    )
    assert set(_map_file(tmp_path / "model.safetensors")) == {"a"}  # b starts at byte 3
    state = _read_tensors(
        tmp_path,
        {"a": torch.empty(3, dtype=torch.int8, device="meta"), "b": torch.empty(2, dtype=torch.int32, device="meta")},
    )
    assert torch.equal(state["a"], a) and torch.equal(state["b"], b)


@pytest.mark.parametrize("max_density", [None, "0"])
def test_backend_summary_names_the_kernel_path_and_column_index(monkeypatch, max_density):
    """`dsf generate`/`eval` print this: the backend, its ISA and, on AVX2, the column
    indices built for the sparsest factors (memory beyond the checkpoint's)."""
    from dsf_runtime.checkpoint import backend_summary
    from dsf_runtime.kernels import BACKENDS
    from dsf_runtime.linear import DSFLinear
    from dsf_runtime.report import format_bytes
    from helpers import random_sparse

    bitmap = BACKENDS["cpu-bitmap"]
    if not bitmap.available():
        pytest.skip("CPU kernel could not be built here")
    if max_density is not None:
        monkeypatch.setenv("DSF_COLUMNS_MAX_DENSITY", max_density)
    L, R = random_sparse(48, 40, 0.34), random_sparse(40, 40, 0.1, seed=1)
    model = torch.nn.Sequential(
        *(DSFLinear.from_factors(L, R, None, fmt="bitmap", value_dtype=torch.float16) for _ in range(3))
    )
    for m in model:
        m.prepare(torch.float32)
    summary = backend_summary(model)
    assert summary.startswith(f"cpu-bitmap x3 ({bitmap.describe()}")
    # fp16 factors run the AVX2 paths on AVX2 CPUs, and on AVX-512 CPUs whose word plan chose them
    on_avx2 = model[0].prepared_operands[1].paths.isa == "avx2"
    if on_avx2 and max_density is None:  # the three 10% R factors, 2 bytes per nonzero
        nnz = int((R != 0).sum())
        assert summary.endswith(f"; column index on 3 factors, {format_bytes(3 * 2 * nnz)})")
    else:
        assert summary == f"cpu-bitmap x3 ({bitmap.describe()})"


HOSTILE = {
    **{
        f"config: {k}": (lambda p, e=e: _edit_config(p, e)) for k, (e, _) in CONFIG_EDITS.items() if k != "not dsf"
    },  # without its quantization_config it is a valid dense model, and serves
    **{f"tensors: {k}": (lambda p, e=e: _edit_tensors(p, e)) for k, (e, _) in TENSOR_EDITS.items()},
    "invalid JSON": lambda p: (p / "config.json").write_text("{not json"),
    "truncated weights": lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:1000]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_dsf_serve_on_a_hostile_checkpoint_prints_one_line(copy, case, capsys, monkeypatch):
    """`dsf serve` (in-process, port 0) on a corrupt checkpoint: exit 2, one line on stderr, no traceback."""
    import logging

    from dsf_runtime.cli import main

    HOSTILE[case](copy)
    monkeypatch.setattr(logging.root, "handlers", [])  # so the CLI's basicConfig logs to stderr, as outside pytest
    assert main(["serve", str(copy), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsf: error: "), err
