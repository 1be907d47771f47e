"""Swap nn.Linear modules of a model for DSFLinear, by module name."""

from __future__ import annotations

import torch
from torch import nn

from dsf_runtime.linear import DSFLinear


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def replace_with_factors(
    model: nn.Module,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
    fmt: str = "bitmap",
    value_dtype: torch.dtype | None = None,
    **format_options,
) -> None:
    """Replace each named nn.Linear by a DSFLinear packed from its (L, R) pair
    (R None: a single pruned matrix)."""
    for name, (L, R) in factors.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, (nn.Linear, DSFLinear)):  # DSFLinear: repacking
            raise TypeError(f"{name} is a {type(linear).__name__}, not nn.Linear")
        cols = L.shape[1] if R is None else R.shape[1]
        if (L.shape[0], cols) != (linear.out_features, linear.in_features):
            raise ValueError(
                f"{name}: factors give {L.shape[0]}x{cols}, layer is {linear.out_features}x{linear.in_features}"
            )
        bias = linear.bias.detach() if linear.bias is not None else None
        set_submodule(model, name, DSFLinear.from_factors(L, R, bias, fmt, value_dtype, **format_options))


def dsf_modules(model: nn.Module) -> dict[str, DSFLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, DSFLinear)}


def set_backend(model: nn.Module, backend: str = "auto") -> None:
    for module in dsf_modules(model).values():
        module.set_backend(backend)
