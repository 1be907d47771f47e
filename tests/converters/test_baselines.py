"""One-matrix baselines: budgets, n:m patterns, and the expected quality order."""

from __future__ import annotations

import pytest
import torch

from dsf_runtime.converters.baselines import magnitude_prune, sparsegpt_prune, wanda_prune
from dsf_runtime.converters.config import preset
from dsf_runtime.converters.factorize import dsf_factorize, weighted_error
from dsf_runtime.converters.methods import make_method
from dsf_runtime.errors import ConfigError
from helpers import correlated_problem

PRUNERS = {"magnitude": magnitude_prune, "wanda": wanda_prune, "sparsegpt": sparsegpt_prune}


@pytest.mark.parametrize("name", sorted(PRUNERS))
@pytest.mark.parametrize("shape", [(37, 53), (64, 300), (130, 20)])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_budget_and_support(name, shape, sparsity):
    W, H = correlated_problem(*shape)
    P = PRUNERS[name](W, H, sparsity)
    assert P.shape == W.shape and P.dtype == W.dtype
    nnz = int((P != 0).sum())
    assert nnz <= int((1 - sparsity) * W.numel())
    assert nnz >= 0.9 * int((1 - sparsity) * W.numel())
    if name != "sparsegpt":  # SparseGPT updates kept weights; the others keep them as they are
        kept = P != 0
        assert torch.equal(P[kept], W[kept])


@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_two_four_pattern(name):
    W, H = correlated_problem(24, 64)
    P = PRUNERS[name](W, H, 0.5, nm=(2, 4))
    groups = (P != 0).reshape(24, 16, 4).sum(dim=2)
    assert int(groups.max()) <= 2


def test_quality_order_on_correlated_inputs():
    W, H = correlated_problem(96, 96, seed=7)
    errs = {name: weighted_error(W, fn(W, H, 0.5), H) for name, fn in PRUNERS.items()}
    L, R = dsf_factorize(W, H, preset("paper", sparsity=0.5))
    errs["dsf"] = weighted_error(W, L @ R, H)
    assert errs["dsf"] < errs["sparsegpt"] < errs["wanda"] < errs["magnitude"], errs


def test_sparsegpt_matches_exact_solution_when_nothing_is_pruned_in_a_row():
    """A row whose weights are all kept must come back unchanged up to the damping."""
    W, H = correlated_problem(8, 16)
    W[0] = 0
    W[0, :8] = 10.0  # huge weights are kept
    P = sparsegpt_prune(W, H, 0.5)
    torch.testing.assert_close(P[0, :8], W[0, :8], rtol=0, atol=1e-5)


def test_method_registry():
    W, H = correlated_problem(16, 32)
    out = make_method("sparsegpt:2:4", 0.5)(W, H)
    assert out.R is None and out.product() is out.L
    pair = make_method("dsf", 0.5, preset("fast"))(W, H)
    assert pair.R is not None and "error_after_finalize" in pair.info
    with pytest.raises(ConfigError, match="unknown method"):
        make_method("obs", 0.5)
    with pytest.raises(ConfigError, match="n:m"):
        make_method("wanda:4:2", 0.5)
