"""Dense reference backend: unpacks the factor once and uses a dense matmul.

Only used when asked for by name (``backend="dense-ref"``), as a numerical reference
in tests and benchmarks; ``auto`` never picks it."""

from __future__ import annotations

import torch

from dsf_runtime.formats import FORMATS, get_format
from dsf_runtime.kernels import register_backend


@register_backend
class DenseReferenceBackend:
    name = "dense-ref"
    devices = ("cpu", "cuda")
    priority = 0  # never chosen automatically

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(FORMATS)

    def available(self) -> bool:
        return True

    def prepare(self, fmt: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype):
        return get_format(fmt).unpack(tensors, shape).to(dtype)

    def matmul(self, prepared: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (x.to(prepared.dtype) @ prepared.t()).to(x.dtype)
