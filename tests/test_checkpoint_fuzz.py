"""Property-based corruption of real checkpoints through the public loading path.

Every corruption either raises CheckpointError with a message, or (when the edit
happens to leave a valid checkpoint, e.g. one finite value replaced by another) loads
a model whose forward pass runs and stays finite. Nothing crashes, hangs, or
allocates from a declared size before checking it against the file."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from dsf_runtime.checkpoint import load_model
from dsf_runtime.converters.pipeline import make_job, run_compress
from dsf_runtime.errors import CheckpointError

FUZZ = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", params=["bitmap", "csr"])
def ckpt(request, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"fuzz-{request.param}") / "ckpt"
    path, _ = run_compress(make_job(str(tiny_model_dir), out, nsamples=4, seqlen=32, progress=False, fmt=request.param))
    return path


def _fresh_copy(ckpt, tmp_path_factory):
    dst = tmp_path_factory.mktemp("case") / "c"
    shutil.copytree(ckpt, dst)
    return dst


def _loads_or_fails_cleanly(path):
    try:
        model, tok = load_model(path)
    except CheckpointError as exc:
        assert str(exc), "error without a message"
        return "rejected"
    ids = tok("It was", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    return "loaded"


def _split(raw: bytes):
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


@FUZZ
@given(fraction=st.floats(0.0, 0.9999))
def test_truncated_file(ckpt, tmp_path_factory, fraction):
    dst = _fresh_copy(ckpt, tmp_path_factory)
    f = dst / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[: int(len(raw) * fraction)])
    with pytest.raises(CheckpointError):
        load_model(dst)


@FUZZ
@given(data=st.data())
def test_header_edits(ckpt, tmp_path_factory, data):
    dst = _fresh_copy(ckpt, tmp_path_factory)
    f = dst / "model.safetensors"
    header, payload = _split(f.read_bytes())
    key = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    kind = data.draw(st.sampled_from(["dtype", "shape", "huge", "offsets"]))
    entry = header[key]
    if kind == "dtype":
        entry["dtype"] = data.draw(
            st.sampled_from(sorted({"F16", "BF16", "F32", "F64", "I8", "I16", "I32", "I64", "U8"} - {entry["dtype"]}))
        )
    elif kind == "shape":
        entry["shape"] = data.draw(
            st.lists(st.integers(0, 5000), min_size=1, max_size=3).filter(lambda s: s != entry["shape"])
        )
    elif kind == "huge":
        entry["shape"] = [2**40] + entry["shape"][1:]
        start = entry["data_offsets"][0]
        entry["data_offsets"] = [start, start + 2**42]
    else:
        start, end = entry["data_offsets"]
        entry["data_offsets"] = [start, end + data.draw(st.integers(1, 10**9))]
    f.write_bytes(_join(header, payload))
    with pytest.raises(CheckpointError):
        load_model(dst)


def _int_tensor_keys(ckpt):
    return sorted(k for k, v in load_file(ckpt / "model.safetensors").items() if not v.is_floating_point())


@FUZZ
@given(data=st.data())
def test_index_and_offset_edits(ckpt, tmp_path_factory, data):
    dst = _fresh_copy(ckpt, tmp_path_factory)
    tensors = load_file(dst / "model.safetensors")
    key = data.draw(st.sampled_from(_int_tensor_keys(ckpt)))
    t = tensors[key].clone()
    if t.numel() == 0:
        return
    pos = data.draw(st.integers(0, t.numel() - 1))
    info = torch.iinfo(t.dtype)
    t.view(-1)[pos] = data.draw(st.integers(info.min, info.max))
    tensors[key] = t
    save_file(tensors, dst / "model.safetensors")
    _loads_or_fails_cleanly(dst)


@FUZZ
@given(data=st.data())
def test_value_edits(ckpt, tmp_path_factory, data):
    dst = _fresh_copy(ckpt, tmp_path_factory)
    tensors = load_file(dst / "model.safetensors")
    key = data.draw(st.sampled_from(sorted(k for k, v in tensors.items() if v.is_floating_point())))
    t = tensors[key].clone()
    pos = data.draw(st.integers(0, t.numel() - 1))
    value = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, 1e4]))
    t.view(-1)[pos] = value
    tensors[key] = t
    save_file(tensors, dst / "model.safetensors")
    outcome = _loads_or_fails_cleanly(dst)
    if value != value or abs(value) == float("inf"):
        assert outcome == "rejected"


@FUZZ
@given(data=st.data())
def test_metadata_edits(ckpt, tmp_path_factory, data):
    dst = _fresh_copy(ckpt, tmp_path_factory)
    config = json.loads((dst / "config.json").read_text())
    modules = config["quantization_config"]["modules"]
    name = data.draw(st.sampled_from(sorted(modules)))
    field = data.draw(st.sampled_from(["out_features", "in_features", "rank", "nnz_left", "nnz_right"]))
    modules[name][field] = data.draw(st.integers(-5, 2**62).filter(lambda v: v != modules[name][field]))
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError):
        load_model(dst)
