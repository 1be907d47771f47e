"""torch.sparse CSR backend: MKL on CPU, cuSPARSE on CUDA.

torch's CPU CSR matmul has no fp16/bf16 path, so on CPU the factor values are
upcast to fp32 once at prepare time and activations are computed in fp32."""

from __future__ import annotations

import warnings

import torch

from dsf_runtime.kernels import register_backend


@register_backend
class TorchCSRBackend:
    name = "torch-csr"
    formats = ("csr",)
    devices = ("cpu", "cuda")
    priority = 10

    def available(self) -> bool:
        return True

    def prepare(self, fmt: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype):
        values = tensors["values"]
        if values.device.type == "cpu":
            dtype = torch.float32 if dtype not in (torch.float32, torch.float64) else dtype
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(
                tensors["crow_indices"],
                tensors["col_indices"],
                values.to(dtype),
                size=shape,
                check_invariants=False,  # validated when the checkpoint was loaded
            )

    def matmul(self, prepared: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # x: (N, cols) -> (N, rows); S @ x^T keeps the sparse operand on the left.
        out_dtype = x.dtype
        y = torch.sparse.mm(prepared, x.to(prepared.dtype).t()).t()
        return y.to(out_dtype)
