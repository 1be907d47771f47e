"""Storage formats for sparse factors: a registry keyed by the name written in checkpoints.

A format knows the names, shapes and dtypes of its tensors for a given matrix shape
and nonzero count (so a model skeleton can be checked before loading), packs a
dense-with-zeros matrix (pure), unpacks back to dense for reference, validates loaded
tensors before any kernel touches them, and counts its bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


class SparseFormat(Protocol):
    name: str

    def specs(
        self, shape: tuple[int, int], nnz: int, value_dtype: torch.dtype, extra: dict | None = None
    ) -> dict[str, TensorSpec]:
        """Expected tensors (name -> spec) of a matrix of this shape and nonzero count;
        ``extra`` holds format-specific counts from the metadata (e.g. BSR's nblocks)."""

    def pack(self, dense: torch.Tensor, value_dtype: torch.dtype, **options) -> dict[str, torch.Tensor]:
        """Dense-with-zeros matrix -> this format's tensors (on CPU)."""

    def extra(self, tensors: dict[str, torch.Tensor]) -> dict:
        """Format-specific counts to record in the metadata (may be empty)."""

    def unpack(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """This format's tensors -> dense matrix (values' dtype)."""

    def validate(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int], nnz: int) -> None:
        """Raise ValueError naming the tensor and the problem if the content is inconsistent."""


FORMATS: dict[str, SparseFormat] = {}


def register_format(cls: Callable[[], SparseFormat]):
    """Class decorator: instantiate and register a format under its ``name``."""
    instance = cls()
    FORMATS[instance.name] = instance
    return cls


def get_format(name: str) -> SparseFormat:
    if name not in FORMATS:
        raise KeyError(f"unknown sparse format {name!r}; known: {', '.join(sorted(FORMATS))}")
    return FORMATS[name]


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf, without a full-size temporary (torch.isfinite allocates abs(t) and
    masks, 1.25x a float32 tensor): min and max propagate NaN, and are finite iff all are."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.reshape(-1))
    return math.isfinite(float(low)) and math.isfinite(float(high))  # Python floats: no per-call tensor ops


def tensors_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


from dsf_runtime.formats import bitmap, bsr, csr  # noqa: E402,F401  (registers the built-in formats)
