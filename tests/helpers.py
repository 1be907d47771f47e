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


def correlated_problem(out_features: int, in_features: int, seed: int = 0, tokens: int = 2048):
    """Random W and the Gram matrix of correlated, unevenly scaled inputs."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_features, in_features, generator=g) / in_features**0.5
    mix = torch.eye(in_features) + 0.5 * torch.randn(in_features, in_features, generator=g) / in_features**0.5
    X = torch.randn(tokens, in_features, generator=g) @ mix * (0.2 + 3 * torch.rand(in_features, generator=g))
    return W, X.T @ X / tokens
