"""What the vLLM linear method needs that does not depend on vLLM: which checkpoint
modules sit behind a vLLM layer, which block of each a rank holds, and the validated,
cut DSF layer built from the tensors vLLM's loader hands over."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from dsf_runtime.checkpoint import DSFQuantConfig, ModuleEntry
from dsf_runtime.errors import CheckpointError
from dsf_runtime.formats import get_format
from dsf_runtime.formats.values import VALUE_DTYPES
from dsf_runtime.linear import DSFLinear, SparseFactor
from dsf_runtime.sharding import Split, gather_parts, shard_layer

FACTORS = ("L", "R")


def module_names(prefix: str, packed: Mapping[str, list[str]], modules: Mapping[str, ModuleEntry]) -> list[str] | None:
    """The checkpoint modules (Hugging Face names) behind the vLLM layer ``prefix``, in
    vLLM's shard order (q, k, v; gate, up), or None when none of them is compressed."""
    parent, _, leaf = prefix.rpartition(".")
    names = [f"{parent}.{part}" if parent else part for part in packed.get(leaf, [leaf])]
    compressed = [name in modules for name in names]
    if not any(compressed):
        return None
    if not all(compressed):
        dense = [n for n, c in zip(names, compressed) if not c]
        raise CheckpointError(
            f"vLLM merges {', '.join(names)} into {prefix}, but {', '.join(dense)} is not compressed: "
            "compress all of them or none"
        )
    return names


def split_of(
    output_partition_sizes: list[int], output_size: int, input_size_per_partition: int, input_size: int
) -> Split:
    """How vLLM cut this layer over the tensor-parallel ranks."""
    if input_size_per_partition != input_size:
        return "row"
    if sum(output_partition_sizes) != output_size:
        return "column"
    return "none"


def column_bounds(total: int, size: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """Rows of a projection with ``total`` outputs held by ``tp_rank`` when each rank holds
    ``size`` of them. Fewer distinct blocks than ranks (grouped-query K/V heads on more
    ranks than heads) means consecutive ranks hold the same block, as vLLM replicates them."""
    if size <= 0 or total % size or tp_size % (total // size):
        raise CheckpointError(f"cannot cut {total} outputs into blocks of {size} over {tp_size} ranks")
    replicas = tp_size // (total // size)
    start = (tp_rank // replicas) * size
    return start, start + size


def expected_tensors(entry: ModuleEntry, quant: DSFQuantConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """'L.<tensor>' / 'R.<tensor>' -> (shape, dtype) that the checkpoint stores for ``entry``."""
    fmt, value_dtype = get_format(quant.format), VALUE_DTYPES[quant.value_dtype]
    shapes = {"L": (entry.out_features, entry.in_features if entry.rank is None else entry.rank)}
    nnz, extra = {"L": entry.nnz_left}, {"L": entry.extra_left}
    if entry.rank is not None:
        shapes["R"], nnz["R"], extra["R"] = (entry.rank, entry.in_features), entry.nnz_right, entry.extra_right
    return {
        f"{side}.{name}": (spec.shape, spec.dtype)
        for side, shape in shapes.items()
        for name, spec in fmt.specs(shape, nnz[side], value_dtype, extra[side]).items()
    }


def assemble(name: str, entry: ModuleEntry, quant: DSFQuantConfig, tensors: Mapping[str, torch.Tensor]) -> DSFLinear:
    """The whole layer ``name`` from its loaded tensors ('L.bitmap', ...), every name,
    shape, dtype, index and value checked first (CheckpointError names what is wrong)."""
    expected = expected_tensors(entry, quant)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        what = f"lacks {name}.{missing[0]}" if missing else f"has an unexpected tensor {name}.{unexpected[0]}"
        raise CheckpointError(f"the checkpoint {what}")
    for key, (shape, dtype) in expected.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise CheckpointError(
                f"tensor {name}.{key}: stored {t.dtype}{list(t.shape)}, expected {dtype}{list(shape)}"
            )
    with torch.device("meta"):  # a skeleton whose factors are replaced by the loaded ones below
        layer = DSFLinear(
            entry.in_features, entry.out_features, entry.rank, quant.format, 0, 0, VALUE_DTYPES[quant.value_dtype]
        )
    nnz = {"L": entry.nnz_left, "R": entry.nnz_right}
    for side in FACTORS if entry.rank is not None else ("L",):
        own = {key.split(".", 1)[1]: t.cpu() for key, t in tensors.items() if key.startswith(side + ".")}
        shape = getattr(layer, side).shape
        try:
            get_format(quant.format).validate(own, shape, nnz[side])
        except ValueError as exc:
            raise CheckpointError(f"{name}.{side}: {exc}") from None
        setattr(layer, side, SparseFactor.from_tensors(shape, quant.format, own, nnz[side]))
    return layer


def _own(part: DSFLinear) -> DSFLinear:
    """``part`` with its own copies of its tensors, so the whole layer's can be freed."""
    for factor in (part.L, part.R):
        for key, t in (factor.stored() if factor is not None else {}).items():
            setattr(factor, key, t.clone())
    return part


def gathers(entries: list[ModuleEntry], split: Split, world: int) -> bool:
    """Whether a column-split layer takes the ``gather`` cut (dsf_runtime.sharding): every
    projection a factor pair whose rank divides evenly over the ranks."""
    return split == "column" and world > 1 and all(e.rank is not None and e.rank % world == 0 for e in entries)


def rank_part(
    name: str,
    entry: ModuleEntry,
    quant: DSFQuantConfig,
    tensors: Mapping[str, torch.Tensor],
    split: Split,
    bounds: tuple[int, int],
    backend: str = "auto",
    ranks: tuple[int, int] | None = None,
) -> DSFLinear | tuple[DSFLinear, DSFLinear]:
    """The validated part of layer ``name`` that one rank runs (``bounds``: output rows
    for a column split, input columns for a row split). With ``ranks`` (a block of the
    rank dimension), the ``gather`` cut: (h block, output block) one-matrix layers."""
    layer = assemble(name, entry, quant, tensors)
    layer.set_backend(backend)
    if ranks is not None:
        right, left = gather_parts(layer, bounds, ranks)
        return _own(right), _own(left)
    part = shard_layer(layer, split, *bounds)
    return _own(part) if split != "none" else part
