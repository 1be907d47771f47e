"""transformers integration for compressed-tensors sparse checkpoints:
``AutoModelForCausalLM.from_pretrained(sparse_bitmask_checkpoint)`` loads sparsely.

transformers sends every ``quant_method: compressed-tensors`` checkpoint to its own
quantizer, which needs a compressed-tensors release that no longer reads sparse formats.
``register`` puts a routing config in front of it: a section that declares sparsity and
no quantization (what ct_reader runs) goes to our quantizer; any other (FP8, int4, ...)
goes on to transformers' own, unchanged. Our quantizer swaps each compressed linear of
the meta skeleton for a slot holding its stored tensors under their own names (shapes
from the safetensors headers, no data read), lets transformers fill them, then turns
each slot into a one-matrix DSFLinear on our bitmap layout, validated like ours.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from dsf_runtime.ct_reader import module_tensors, runs_sparse_only, stored_parts, supported_format
from dsf_runtime.errors import CheckpointError

QUANT_METHOD = "dsf-compressed-tensors"  # our quantizer's key; checkpoints keep "compressed-tensors"
_SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I32": torch.int32,
    "I64": torch.int64,
}


class CompressedTensorsSlot(nn.Module):
    """One compressed linear's stored tensors under their checkpoint names, while
    transformers loads them; replaced by a DSFLinear once they are filled."""

    def __init__(self, parts: dict[str, tuple[torch.dtype, tuple[int, ...]]], linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        for name, (dtype, shape) in parts.items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device="meta"))
        self.bias = linear.bias  # stored dense, loaded by transformers like any bias

    def stored(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a compressed-tensors slot runs only after loading turns it into a DSFLinear")


def header_specs(files: Iterable[str]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor in the safetensors files, read from headers only."""
    from safetensors import safe_open

    specs = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    part = f.get_slice(key)
                    dtype = _SAFETENSORS_DTYPES.get(part.get_dtype())
                    if dtype is None:
                        raise CheckpointError(f"{file}: tensor {key} has dtype {part.get_dtype()}, not one we read")
                    specs[key] = (dtype, tuple(part.get_shape()))
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{file} is unreadable or truncated: {str(exc).splitlines()[0]}") from None
    return specs


def insert_slots(model: nn.Module, fmt: str, files: Iterable[str] | None) -> list[str]:
    """Swap every linear the checkpoint stores compressed for a slot; their names."""
    from dsf_runtime.patch import set_submodule

    if not files:
        raise CheckpointError("compressed-tensors sparse checkpoints load from safetensors files only")
    specs = header_specs(files)
    names = sorted(k[: -len(".bitmask")] for k in specs if k.endswith(".bitmask"))
    if not names:
        raise CheckpointError(f"config.json declares {fmt}, but no tensor is stored in it")
    for name in names:
        missing = [p for p in stored_parts(fmt) if f"{name}.{p}" not in specs]
        if missing:
            raise CheckpointError(f"the checkpoint lacks {name}.{missing[0]}")
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"the checkpoint compresses {name!r}, which the model does not have") from None
        _, bitmask_shape = specs[f"{name}.bitmask"]
        if not isinstance(linear, nn.Linear) or bitmask_shape != (linear.out_features, (linear.in_features + 7) // 8):
            raise CheckpointError(f"{name}.bitmask is {list(bitmask_shape)}, which does not fit the model's {linear}")
        parts = {p: specs[f"{name}.{p}"] for p in stored_parts(fmt)}
        set_submodule(model, name, CompressedTensorsSlot(parts, linear))
    return names


def replace_slots(model: nn.Module, fmt: str) -> None:
    """Turn every filled slot into a one-matrix DSFLinear on our bitmap layout."""
    from dsf_runtime.linear import DSFLinear, SparseFactor
    from dsf_runtime.patch import set_submodule

    slots = {name: m for name, m in model.named_modules() if isinstance(m, CompressedTensorsSlot)}
    for name, slot in slots.items():
        parts = slot.stored(stored_parts(fmt))
        never = [part for part, t in parts.items() if t.is_meta]
        if never:
            raise CheckpointError(f"tensors never loaded: {name}.{never[0]}")
        ours, rows, cols = module_tensors(name, parts, fmt)
        nnz = ours["values"].numel()
        bias = slot.bias
        with torch.device("meta"):
            layer = DSFLinear(cols, rows, None, "bitmap", 0, 0, ours["values"].dtype, bias is not None)
        layer.L = SparseFactor.from_tensors((rows, cols), "bitmap", ours, nnz)
        layer.bias = bias
        set_submodule(model, name, layer)


def register(HfQuantizer, QuantizationConfigMixin, config_mapping: dict, quantizer_mapping: dict) -> None:
    """Route sparse-only compressed-tensors sections to our quantizer (idempotent)."""
    from dsf_runtime.checkpoint import finish_loaded_model

    class DSFSparseCTConfig(QuantizationConfigMixin):
        """A compressed-tensors section that declares sparsity only, run by dsf-runtime."""

        def __init__(self, **section):
            self.section = {**section, "quant_method": "compressed-tensors"}
            self.quant_method = QUANT_METHOD
            self.format = supported_format(self.section, "config.json quantization_config")

        def to_dict(self) -> dict:
            return dict(self.section)  # saved back as the checkpoint declared it

        def to_diff_dict(self) -> dict:
            return self.to_dict()

    class DSFSparseCTQuantizer(HfQuantizer):
        requires_calibration = True

        def validate_environment(self, *args, **kwargs):
            return None

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            insert_slots(model, self.quantization_config.format, checkpoint_files)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            replace_slots(model, self.quantization_config.format)  # a slot left on meta: never loaded
            finish_loaded_model(model)
            return model

        def is_serializable(self, *args, **kwargs) -> bool:
            return False  # export with `dsf export --to compressed-tensors`

        @property
        def is_trainable(self) -> bool:
            return False

    original = config_mapping.get("compressed-tensors")
    if original is None or getattr(original, "_dsf_routes", False):
        return

    class RoutingConfig(original):
        """transformers' compressed-tensors config, except for sparse-only sections."""

        _dsf_routes = True

        @classmethod
        def from_dict(cls, config_dict, *args, **kwargs):
            if runs_sparse_only(config_dict):
                config = DSFSparseCTConfig(**config_dict)
                return (config, {}) if kwargs.get("return_unused_kwargs") else config
            return original.from_dict(config_dict, *args, **kwargs)

    config_mapping["compressed-tensors"] = RoutingConfig
    config_mapping.setdefault(QUANT_METHOD, DSFSparseCTConfig)
    quantizer_mapping.setdefault(QUANT_METHOD, DSFSparseCTQuantizer)
