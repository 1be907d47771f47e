"""Every backend on every format it supports matches the dense product."""

from __future__ import annotations

import pytest
import torch

from dsf_runtime.errors import ConfigError
from dsf_runtime.formats import get_format
from dsf_runtime.kernels import BACKENDS, choose_backend
from helpers import random_sparse

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [
    (b, f, d)
    for b in sorted(BACKENDS)
    for f in BACKENDS[b].formats
    for d in DEVICES
    if d in BACKENDS[b].devices and BACKENDS[b].available()
]


@pytest.mark.parametrize("backend,fmt,device", CASES)
@pytest.mark.parametrize("shape", [(830, 545), (545, 830), (17, 3), (1, 64)])
@pytest.mark.parametrize("density", [0.01, 0.25, 0.9])
@pytest.mark.parametrize("batch", [1, 5, 16])
@pytest.mark.parametrize("value_dtype", [torch.float16, torch.int8])
def test_matmul_matches_dense(backend, fmt, device, shape, density, batch, value_dtype):
    b = BACKENDS[backend]
    if value_dtype == torch.int8 and fmt == "bsr":
        pytest.skip("bsr stores no int8 values")
    tensors = get_format(fmt).pack(random_sparse(*shape, density, seed=batch), value_dtype)
    dense = get_format(fmt).unpack(tensors, shape).float()  # the stored numbers (int8: dequantized)
    prepared = b.prepare(fmt, {k: v.to(device) for k, v in tensors.items()}, shape, torch.float32)
    x = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(1))
    y = b.matmul(prepared, x.to(device)).cpu()
    ref = (x.double() @ dense.double().t()).float()
    assert y.shape == (batch, shape[0]) and y.dtype == x.dtype
    # fp32 accumulation over at most 830 terms: relative error well under 1e-5.
    scale = ref.abs().max().clamp_min(1.0)
    assert (y - ref).abs().max() <= 2e-5 * scale


def test_auto_never_picks_dense_reference():
    assert choose_backend("csr", "cpu").name != "dense-ref"
    assert choose_backend("csr", "cpu", "dense-ref").name == "dense-ref"


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown backend"):
        choose_backend("csr", "cpu", "warp-drive")


def test_can_run_says_why_not(monkeypatch):
    from dsf_runtime.kernels import backend_report, can_run

    assert can_run(BACKENDS["torch-bsr"], "bitmap", "cpu") == (False, "does not run the 'bitmap' format (runs bsr)")
    assert can_run(BACKENDS["triton-bitmap"], "bitmap", "cpu")[1] == "runs on cuda, not cpu"
    fp32 = {"values": torch.zeros(3, dtype=torch.float32)}
    if BACKENDS["cpu-bitmap"].available():
        assert can_run(BACKENDS["cpu-bitmap"], "bitmap", "cpu", fp32) == (False, "does not take torch.float32 values")
    monkeypatch.setenv("DSF_DISABLED_BACKENDS", "cpu-bitmap")
    assert can_run(BACKENDS["cpu-bitmap"], "bitmap", "cpu") == (False, "disabled by DSF_DISABLED_BACKENDS")
    rows = backend_report("bitmap", "cpu")
    assert [r[0] for r in rows if r[2]][0] == "torch-csr"  # what auto takes now
    assert {r[0] for r in rows} == set(BACKENDS)


def test_disabled_backends_are_never_chosen(monkeypatch):
    monkeypatch.setenv("DSF_DISABLED_BACKENDS", "cpu-bitmap,torch-csr")
    with pytest.raises(ConfigError, match="no backend runs format 'bitmap' on cpu .*cpu-bitmap: disabled"):
        choose_backend("bitmap", "cpu")
    with pytest.raises(ConfigError, match="backend 'torch-csr' cannot run format 'csr' on cpu: disabled"):
        choose_backend("csr", "cpu", "torch-csr")
    monkeypatch.setenv("DSF_DISABLED_BACKENDS", "cpu-bitmap")
    assert choose_backend("bitmap", "cpu").name == "torch-csr"
    monkeypatch.setenv("DSF_DISABLED_BACKENDS", "no-such-kernel")
    with pytest.raises(ConfigError, match="unknown backends no-such-kernel"):
        choose_backend("bitmap", "cpu")
