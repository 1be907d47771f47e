"""What a model holds: per-layer shapes, densities and bytes, and totals vs dense."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dsf_runtime.linear import DSFLinear
from dsf_runtime.models import compressible_linears
from dsf_runtime.patch import dsf_modules


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


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
