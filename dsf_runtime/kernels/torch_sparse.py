"""torch.sparse backends: MKL on CPU, cuSPARSE on CUDA.

``torch-csr`` runs the csr and bitmap formats (a bitmap is decoded to CSR once at
prepare time: compact on disk, CSR in memory); ``torch-bsr`` runs bsr. torch's CPU
sparse matmul has no fp16/bf16 path, so on CPU values are upcast to fp32 once at
prepare time and activations are computed in fp32."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from dsf_runtime.formats import get_format
from dsf_runtime.kernels import register_backend


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    if device.type == "cpu" and dtype not in (torch.float32, torch.float64):
        return torch.float32
    return dtype


@dataclass
class Prepared:
    matrix: torch.Tensor  # torch sparse CSR/BSR
    rows: int
    cols: int


class _TorchSparse:
    devices = ("cpu", "cuda")

    def available(self) -> bool:
        return True

    def matmul(self, prepared: Prepared, x: torch.Tensor) -> torch.Tensor:
        # x: (N, cols) -> (N, rows); S @ x^T keeps the sparse operand on the left.
        S = prepared.matrix
        xt = x.to(S.dtype).t()
        pad = S.shape[1] - prepared.cols
        if pad:
            xt = torch.nn.functional.pad(xt, (0, 0, 0, pad))
        y = torch.sparse.mm(S, xt)[: prepared.rows].t()
        return y.to(x.dtype)


@register_backend
class TorchCSRBackend(_TorchSparse):
    name = "torch-csr"
    formats = ("csr", "bitmap")
    priority = 10

    def prepare(
        self, fmt: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype
    ) -> Prepared:
        crow, col, values = get_format(fmt).to_csr(tensors, shape)
        dtype = _compute_dtype(values.device, dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            matrix = torch.sparse_csr_tensor(
                crow,
                col.to(crow.dtype),
                values.to(dtype),
                size=shape,
                check_invariants=False,  # validated when the checkpoint was loaded
            )
        return Prepared(matrix, *shape)


@register_backend
class TorchBSRBackend(_TorchSparse):
    name = "torch-bsr"
    formats = ("bsr",)
    priority = 10

    def prepare(
        self, fmt: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype
    ) -> Prepared:
        f = get_format(fmt)
        crow, col, values = f.to_bsr(tensors, shape)
        dtype = _compute_dtype(values.device, dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            matrix = torch.sparse_bsr_tensor(
                crow, col, values.to(dtype), size=f.padded_shape(tensors, shape), check_invariants=False
            )
        return Prepared(matrix, *shape)
