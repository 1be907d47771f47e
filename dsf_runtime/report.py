"""What a model holds: per-layer shapes, densities and bytes, and totals vs dense."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsf_runtime.formats import FORMATS, get_format, tensors_nbytes

from dsf_runtime.linear import DSFLinear
from dsf_runtime.models import compressible_linears
from dsf_runtime.patch import dsf_modules
from dsf_runtime.units import format_bytes  # noqa: F401  (re-exported for the CLI)


@dataclass
class LayerInfo:
    name: str
    out_features: int
    in_features: int
    rank: int | None  # None: one sparse matrix
    density_left: float
    density_right: float | None
    total_density: float  # (nnz L + nnz R) / (out * in)
    nbytes: int
    dense_bf16_bytes: int


def layer_infos(model: nn.Module) -> list[LayerInfo]:
    rows = []
    for name, m in dsf_modules(model).items():
        rows.append(
            LayerInfo(
                name=name,
                out_features=m.out_features,
                in_features=m.in_features,
                rank=m.rank,
                density_left=m.L.nnz / (m.L.shape[0] * m.L.shape[1]),
                density_right=None if m.R is None else m.R.nnz / (m.R.shape[0] * m.R.shape[1]),
                total_density=m.nnz / (m.out_features * m.in_features),
                nbytes=m.nbytes(),
                dense_bf16_bytes=2 * m.out_features * m.in_features,
            )
        )
    return rows


def linear_bytes(model: nn.Module) -> int:
    """Bytes of the compressible linear layers as stored in memory (DSF or dense)."""
    total = 0
    for name in compressible_linears(model):
        module = model.get_submodule(name)
        if isinstance(module, DSFLinear):
            total += module.nbytes()
        else:
            total += sum(p.numel() * p.element_size() for p in module.parameters())
    return total


def format_bytes_of(mats: list[torch.Tensor], value_dtype: torch.dtype = torch.float16) -> dict[str, int]:
    """Total bytes of the matrices in every registered format that stores ``value_dtype``,
    and ('<format>+int8') in those that also store int8 values with row scales."""
    variants = [(name, name, value_dtype) for name in sorted(FORMATS)]
    if value_dtype != torch.int8:
        variants += [(f"{name}+int8", name, torch.int8) for name in sorted(FORMATS)]
    sizes = {}
    for label, name, dtype in variants:
        try:
            sizes[label] = sum(tensors_nbytes(get_format(name).pack(m, dtype)) for m in mats)
        except ValueError:  # the format does not store this value type
            continue
    return sizes


def model_format_bytes(model: nn.Module, value_dtype: torch.dtype = torch.float16) -> tuple[dict[str, int], int]:
    """(bytes per format of all DSF factors, dense bf16 bytes of the same linears)."""
    mats, dense = [], 0
    for m in dsf_modules(model).values():
        mats.append(m.L.to_dense())
        if m.R is not None:
            mats.append(m.R.to_dense())
        dense += 2 * m.out_features * m.in_features
    return format_bytes_of(mats, value_dtype), dense
