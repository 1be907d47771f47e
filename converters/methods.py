"""Compression methods behind one signature: (W, H) -> Factors.

DSF gives a pair (L, R); the one-matrix baselines give a single sparse matrix
(R is None). A registry keyed by the name written in checkpoints and reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from dsf_runtime.converters.baselines import magnitude_prune, sparsegpt_prune, wanda_prune
from dsf_runtime.converters.config import DSFConfig
from dsf_runtime.converters.factorize import dsf_factorize_info
from dsf_runtime.errors import ConfigError


@dataclass
class Factors:
    L: torch.Tensor  # (out, r), or the pruned W (out, in) when R is None
    R: torch.Tensor | None  # (r, in)
    info: dict[str, float] = field(default_factory=dict)

    def product(self) -> torch.Tensor:
        return self.L if self.R is None else self.L @ self.R


Method = Callable[[torch.Tensor, torch.Tensor], Factors]


def _baseline(fn, sparsity: float, nm: tuple[int, int] | None) -> Method:
    def run(W: torch.Tensor, H: torch.Tensor) -> Factors:
        return Factors(fn(W, H, sparsity, nm=nm), None)

    return run


def make_method(name: str, sparsity: float, dsf: DSFConfig | None = None) -> Method:
    """A method by name: dsf, sparsegpt, wanda, magnitude; ':2:4' suffix for n:m."""
    base, _, pattern = name.partition(":")
    nm = None
    if pattern:
        try:
            n, m = (int(v) for v in pattern.split(":"))
        except ValueError:
            raise ConfigError(f"bad n:m pattern in method {name!r}; use e.g. sparsegpt:2:4") from None
        if not 0 < n < m:
            raise ConfigError(f"bad n:m pattern in method {name!r}: need 0 < n < m")
        nm = (n, m)
    if base == "dsf":
        if nm:
            raise ConfigError("dsf has no n:m variant")
        config = (dsf or DSFConfig()).model_copy(update={"sparsity": sparsity})

        def run(W: torch.Tensor, H: torch.Tensor) -> Factors:
            L, R, info = dsf_factorize_info(W, H, config)
            return Factors(L, R, info)

        return run
    table = {"sparsegpt": sparsegpt_prune, "wanda": wanda_prune, "magnitude": magnitude_prune}
    if base not in table:
        raise ConfigError(f"unknown method {name!r}; choose from dsf, {', '.join(table)} (n:m as e.g. sparsegpt:2:4)")
    return _baseline(table[base], sparsity, nm)


METHOD_NAMES = ("dsf", "sparsegpt", "wanda", "magnitude")
