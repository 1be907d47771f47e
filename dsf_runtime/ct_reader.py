"""Reads sparse checkpoints saved in compressed-tensors' formats straight into our layout.

llm-compressor and compressed-tensors saved pruned models (SparseGPT, Wanda, 2:4) as:

    <module>.shape        int64, the dense (rows, cols)
    <module>.bitmask      uint8 (rows, ceil(cols / 8)), bit j of byte b = column 8 b + j
    <module>.compressed   the kept values in row-major order: (nnz,) for sparse-bitmask,
                          (rows, cols / 2) for sparse-24-bitmask (2:4)
    <module>.row_offsets  int64 (rows,), each row's first value (sparse-bitmask only)

with ``quantization_config = {quant_method: "compressed-tensors", sparsity_config:
{format, targets, ignore, ...}}`` in config.json. Four bitmask bytes in a row are, read
little-endian, one 32-column word of our bitmap format, so a bitmask becomes our bitmap
by padding rows to whole words (a view when they already are), and the values are taken
as they are: a one-matrix DSF layer (rank None), with no dense weight built. This reader
is our own; it needs no compressed-tensors package. The format named in config.json only
selects among the formats below, never code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch

from dsf_runtime.checkpoint import CONFIG_NAME, DSFQuantConfig, ModuleEntry, _map_file, _weight_files
from dsf_runtime.errors import CheckpointError

SPARSE_FORMATS = ("sparse-bitmask", "sparse-24-bitmask")
_FLOAT_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_PARTS = ("shape", "bitmask", "compressed", "row_offsets")


def sparsity_config(config: dict) -> dict | None:
    """The compressed-tensors sparsity section of a config.json dict, None if there is none."""
    qc = _section(config)
    if qc.get("quant_method") != "compressed-tensors":
        return None
    return qc.get("sparsity_config") or {}


def is_compressed_tensors(path: str | os.PathLike) -> bool:
    """True for a model directory whose config.json declares compressed-tensors."""
    config = Path(path) / CONFIG_NAME
    try:
        return config.is_file() and sparsity_config(json.loads(config.read_text())) is not None
    except (OSError, ValueError, AttributeError):
        return False


def _section(config: dict) -> dict:
    qc = config.get("quantization_config") or config.get("compression_config")
    return qc if isinstance(qc, dict) else {}


def runs_sparse_only(qc: dict) -> bool:
    """True for a compressed-tensors section that declares sparsity and no quantization:
    the checkpoints this reader runs (or names as unsupported), never a quantized one."""
    sparsity = qc.get("sparsity_config") if isinstance(qc, dict) else None
    return (
        qc.get("quant_method") == "compressed-tensors"
        and isinstance(sparsity, dict)
        and sparsity.get("format") not in (None, "dense")
        and not qc.get("config_groups")
    )


def supported_format(qc: dict, where: str) -> str:
    """The sparsity format of a compressed-tensors section, or one error naming what runs."""
    fmt = (qc.get("sparsity_config") or {}).get("format")
    if qc.get("config_groups") or qc.get("format") not in (None, "dense", fmt):
        raise CheckpointError(
            f"{where}: quantized compressed-tensors checkpoints (format {qc.get('format')!r}) are not run yet; "
            f"supported: sparsity formats {', '.join(SPARSE_FORMATS)} with unquantized values"
        )
    if fmt not in SPARSE_FORMATS:
        raise CheckpointError(
            f"{where}: compressed-tensors sparsity format {fmt!r} is not supported; supported: "
            f"{', '.join(SPARSE_FORMATS)} (a pruned checkpoint stored dense: dsf convert --min-sparsity)"
        )
    return fmt


def stored_parts(fmt: str) -> tuple[str, ...]:
    """The tensors each compressed module stores in ``fmt``."""
    return ("shape", "bitmask", "compressed") + (("row_offsets",) if fmt == "sparse-bitmask" else ())


def _to_bitmap(bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 (rows, ceil(cols/8)) little-endian bytes -> int32 (rows, ceil(cols/32))."""
    rows, nbytes = bitmask.shape
    words = (cols + 31) // 32
    if nbytes != 4 * words:
        padded = torch.zeros(rows, 4 * words, dtype=torch.uint8)
        padded[:, :nbytes] = bitmask
        bitmask = padded
    bitmask = bitmask.contiguous()
    if bitmask.storage_offset() % 4:  # a file view at an odd offset: int32 needs 4-byte alignment
        bitmask = bitmask.clone()
    return bitmask.view(torch.int32)  # little-endian bytes: one 32-column word


def module_tensors(prefix: str, parts: dict[str, torch.Tensor], fmt: str) -> tuple[dict[str, torch.Tensor], int, int]:
    """Our bitmap tensors of one compressed module: ({bitmap, row_offsets, values}, rows, cols)."""
    shape = parts["shape"].reshape(-1).tolist()
    if len(shape) != 2 or min(shape) < 1:
        raise CheckpointError(f"{prefix}.shape is {shape}, not the (rows, cols) of a linear weight")
    rows, cols = (int(v) for v in shape)
    bitmask, values = parts["bitmask"], parts["compressed"]
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, (cols + 7) // 8):
        raise CheckpointError(
            f"{prefix}.bitmask is {bitmask.dtype}{list(bitmask.shape)}, expected uint8[{rows}, {(cols + 7) // 8}]"
        )
    if values.dtype not in _FLOAT_NAMES:
        raise CheckpointError(
            f"{prefix}.compressed holds {values.dtype}; supported value dtypes: {', '.join(_FLOAT_NAMES.values())}"
        )
    if fmt == "sparse-24-bitmask" and (cols % 4 or tuple(values.shape) != (rows, cols // 2)):
        raise CheckpointError(f"{prefix}.compressed is {list(values.shape)}, expected 2:4 values [{rows}, {cols // 2}]")
    bitmap = _to_bitmap(bitmask, cols)
    from dsf_runtime.formats.bitmap import row_popcounts

    counts = row_popcounts(bitmap)
    offsets = torch.zeros(rows + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    if "row_offsets" in parts:
        given = parts["row_offsets"].reshape(-1).long()
        if given.numel() != rows or not torch.equal(given, offsets[:-1]):
            raise CheckpointError(f"{prefix}.row_offsets do not match its bitmask's row counts")
    values = values.reshape(-1)
    if values.numel() != int(offsets[-1]):
        raise CheckpointError(f"{prefix}.compressed has {values.numel()} values, its bitmask marks {int(offsets[-1])}")
    if int(offsets[-1]) >= 2**31:
        raise CheckpointError(f"{prefix} has too many values for int32 offsets")
    return {"bitmap": bitmap, "row_offsets": offsets.to(torch.int32), "values": values}, rows, cols


def read_compressed_tensors(
    path: str | os.PathLike,
) -> tuple[dict, DSFQuantConfig, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]]:
    """(model config without its quantization section, our metadata, state reader) of a
    compressed-tensors sparse checkpoint: what checkpoint.build_model takes."""
    from safetensors import safe_open

    ckpt = Path(path)
    try:
        config = json.loads((ckpt / CONFIG_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{ckpt / CONFIG_NAME} is not readable JSON: {exc}") from None
    fmt = supported_format(_section(config), str(ckpt / CONFIG_NAME))
    config = {k: v for k, v in config.items() if k not in ("quantization_config", "compression_config")}
    keys: dict[str, torch.Tensor] = {}  # every stored tensor, as a view of its mapped file
    for file in _weight_files(ckpt):
        try:
            with safe_open(str(file), framework="pt") as f:
                views = _map_file(file)  # after safe_open accepted the header
                keys.update((k, views[k] if k in views else f.get_tensor(k)) for k in f.keys())
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"{file} is unreadable or truncated: {str(exc).splitlines()[0]}") from None
    tensor = keys.__getitem__

    prefixes = sorted(k[: -len(".bitmask")] for k in keys if k.endswith(".bitmask"))
    modules, packed, stored, dtype = {}, {}, 0, None
    for prefix in prefixes:
        need = stored_parts(fmt)
        missing = [p for p in need if f"{prefix}.{p}" not in keys]
        if missing:
            raise CheckpointError(f"the checkpoint lacks {prefix}.{missing[0]}")
        ours, rows, cols = module_tensors(prefix, {p: tensor(f"{prefix}.{p}") for p in need}, fmt)
        dtype = dtype or ours["values"].dtype
        if ours["values"].dtype != dtype:
            raise CheckpointError(f"{prefix}.compressed is {ours['values'].dtype}, other modules {dtype}")
        packed[prefix] = ours
        nnz = ours["values"].numel()
        stored += nnz
        modules[prefix] = ModuleEntry(
            out_features=rows, in_features=cols, rank=None, nnz_left=nnz, nnz_right=0, bias=f"{prefix}.bias" in keys
        )
    if not modules:
        raise CheckpointError(f"{ckpt}: config.json declares {fmt}, but no tensor is stored in it")
    total = sum(e.out_features * e.in_features for e in modules.values())
    quant = DSFQuantConfig(
        format="bitmap",
        value_dtype=_FLOAT_NAMES[dtype],
        sparsity=min(max(1 - stored / total, 1e-6), 1 - 1e-6),
        method=f"compressed-tensors {fmt}",
        modules=modules,
    )
    compressed_keys = {f"{p}.{part}" for p in prefixes for part in _PARTS}
    if not (config.get("dtype") or config.get("torch_dtype")):  # the dense parts' dtype, as stored
        dense = next((k for k in sorted(keys) if k not in compressed_keys and k.endswith(".weight")), None)
        config["torch_dtype"] = _FLOAT_NAMES.get(tensor(dense).dtype, "float32") if dense else "float32"

    def read_state(expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state = {f"{p}.L.{name}": t for p, ours in packed.items() for name, t in ours.items()}
        state.update((key, t) for key, t in keys.items() if key not in compressed_keys)
        return state  # names, shapes and dtypes are checked by checkpoint.build_model

    return config, quant, read_state


def load_compressed_tensors(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    backend: str = "auto",
    dtype: torch.dtype | None = None,
    with_tokenizer: bool = True,
):
    """(model, tokenizer) of a compressed-tensors sparse checkpoint, run sparsely: each
    compressed linear a one-matrix DSFLinear on our bitmap layout, validated like ours."""
    from dsf_runtime.checkpoint import build_model

    config, quant, read_state = read_compressed_tensors(path)
    return build_model(config, quant, read_state, Path(path), device, backend, dtype, with_tokenizer)
