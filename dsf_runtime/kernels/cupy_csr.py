"""cupy-csr: cuSPARSE called through cupy, with the call chosen per shape by measurement.

torch-csr reaches cuSPARSE through torch.sparse.mm, which picks the routine and its
algorithm itself (and is 20-30x slower than dense at batch 4-16 on an H200). Here the
factor is CSR on the GPU (torch tensors, handed to cupy without copies through DLPack),
and y = S x^T runs as one SpMV at batch 1, and above it as whichever of one SpMM or one
SpMV per batch row a measured plan (kernels/plan_cache.py) found faster for that shape
and batch. Values stay fp16 where cupy's sparse matrices and cuSPARSE take them (checked
at load), else they are computed in fp32, as bf16 factors always are."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsf_runtime.formats import get_format
from dsf_runtime.kernels import cupy_common, register_backend
from dsf_runtime.kernels.plan_cache import MeasuredPlan, cuda_timer


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype cuSPARSE computes a factor in: fp16 stays, anything else is fp32."""
    return torch.float16 if dtype == torch.float16 else torch.float32


@dataclass
class Prepared:
    crow: torch.Tensor  # int32 (rows + 1,)
    col: torch.Tensor  # int32 (nnz,)
    values: torch.Tensor  # (nnz,) in compute dtype
    rows: int
    cols: int
    matrix: object = field(default=None, repr=False)  # cupyx.scipy.sparse.csr_matrix over the tensors above


PLAN = MeasuredPlan(cuda_timer(), default="spmm")


def _y_spmv(p: Prepared, x: torch.Tensor) -> torch.Tensor:
    """One SpMV per batch row: x (N, cols) -> (N, rows)."""
    from cupyx import cusparse

    y = torch.empty(x.shape[0], p.rows, dtype=x.dtype, device=x.device)
    for n in range(x.shape[0]):
        cusparse.spmv(p.matrix, cupy_common.to_cupy(x[n]), y=cupy_common.to_cupy(y[n]))
    return y


def _y_spmm(p: Prepared, x: torch.Tensor) -> torch.Tensor:
    """One SpMM: S (rows, cols) @ x^T (cols, N, column-major: x itself) -> y^T."""
    from cupyx import cusparse

    c = cusparse.spmm(p.matrix, cupy_common.to_cupy(x).T)  # (rows, N)
    return cupy_common.to_torch(c).t().contiguous()


@register_backend
class CupyCSRBackend(cupy_common.CupyBackend):
    name = "cupy-csr"
    formats = ("csr", "bitmap")
    priority = 5  # below triton-bitmap and torch-csr until measured faster: asked for by name

    def prepare(
        self, fmt: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype
    ) -> Prepared:
        crow, col, values = get_format(fmt).to_csr(tensors, shape)
        crow, col = crow.to(torch.int32).contiguous(), col.to(torch.int32).contiguous()
        p = Prepared(crow, col, values.to(compute_dtype(dtype)).contiguous(), *shape)
        try:
            return self._wrap(p, probe=p.values.dtype == torch.float16)
        except (TypeError, ValueError, RuntimeError):  # a cupy or cuSPARSE without fp16 sparse support
            p.values = p.values.float()
            return self._wrap(p, probe=False)

    @staticmethod
    def _wrap(p: Prepared, probe: bool) -> Prepared:
        """Give ``p`` its cupy matrix over the same memory; ``probe`` runs one SpMV so that an
        unsupported dtype fails here, at load, rather than at the first token."""
        import cupyx.scipy.sparse as cusp

        with cupy_common.on_torch_stream():
            parts = (cupy_common.to_cupy(p.values), cupy_common.to_cupy(p.col), cupy_common.to_cupy(p.crow))
            p.matrix = cusp.csr_matrix(parts, shape=(p.rows, p.cols), copy=False)
            if probe:
                _y_spmv(p, torch.zeros(1, p.cols, dtype=p.values.dtype, device=p.values.device))
        return p

    def matmul(self, prepared: Prepared, x: torch.Tensor) -> torch.Tensor:
        p = prepared
        N = x.shape[0]
        if N == 0 or p.rows == 0 or p.cols == 0:
            return torch.zeros(N, p.rows, dtype=x.dtype, device=x.device)
        xc = x.to(p.values.dtype).contiguous()
        with cupy_common.on_torch_stream():
            if N == 1:
                y = _y_spmv(p, xc)
            else:
                ways = {"spmm": lambda: _y_spmm(p, xc), "spmv": lambda: _y_spmv(p, xc)}
                capturing = torch.cuda.is_current_stream_capturing()
                way = PLAN.choose((p.rows, p.cols, p.values.dtype, N), ways, can_time=not capturing)
                y = ways[way]()
        return y.to(x.dtype)
