"""Test helpers shared across packages."""

from __future__ import annotations

import torch


def random_sparse(rows: int, cols: int, density: float, seed: int = 0, empty_rows: int = 0) -> torch.Tensor:
    """A dense-with-zeros matrix of the given density; the first ``empty_rows`` rows are zero."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, cols, generator=g)
    dense = dense * (torch.rand(rows, cols, generator=g) < density)
    dense[:empty_rows] = 0
    return dense
