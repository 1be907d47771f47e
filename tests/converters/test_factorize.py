"""DSF as pure functions on small matrices: budgets, convergence, and quality vs pruning."""

from __future__ import annotations

import pytest
import torch

from dsf_runtime.converters.config import DSFConfig, preset
from dsf_runtime.converters.factorize import dsf_factorize, split_budget, topk_mask, weighted_error
from dsf_runtime.errors import ConfigError
from helpers import correlated_problem


@pytest.mark.parametrize(
    "shape,square,other",
    [((8192, 8192), 0.16, 0.34), ((1024, 8192), 0.25, 0.469), ((8192, 28672), 0.25, 0.429)],
)
def test_budget_split_matches_paper_logs(shape, square, other):
    out_f, in_f = shape
    b = split_budget(out_f, in_f, 0.5)
    r = min(shape)
    assert b.square / (r * r) == pytest.approx(square, abs=1e-4)
    other_size = out_f * in_f  # the non-square factor is out x r or r x in: r * max(shape)
    assert b.other / (r * max(shape)) == pytest.approx(other, abs=2e-3)
    assert b.square + b.other == b.total == int(0.5 * other_size)
    assert b.square_is_left == (out_f < in_f)


@pytest.mark.parametrize("shape", [(48, 64), (64, 48), (40, 40), (37, 53), (53, 37), (8, 96)])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_factors_respect_budget_and_shapes(shape, sparsity):
    W, H = correlated_problem(*shape)
    config = DSFConfig(sparsity=sparsity, outer_iters=4, finalize_iters=4)
    L, R = dsf_factorize(W, H, config)
    r = min(shape)
    assert L.shape == (shape[0], r) and R.shape == (r, shape[1])
    b = split_budget(*shape, sparsity)
    nnz_l, nnz_r = int((L != 0).sum()), int((R != 0).sum())
    square_nnz, other_nnz = (nnz_l, nnz_r) if b.square_is_left else (nnz_r, nnz_l)
    assert square_nnz <= b.square and other_nnz <= b.other
    assert nnz_l + nnz_r <= int((1 - sparsity) * shape[0] * shape[1])
    # The budget is used, not just respected (a few exact zeros may remain).
    assert nnz_l + nnz_r >= 0.95 * b.total
    assert torch.isfinite(L).all() and torch.isfinite(R).all()


def test_error_decreases_with_iterations():
    W, H = correlated_problem(64, 48, seed=1)
    errors = []
    for iters in (1, 4, 16, 40):
        L, R = dsf_factorize(W, H, DSFConfig(sparsity=0.5, outer_iters=iters, finalize=False))
        errors.append(weighted_error(W, L @ R, H))
    assert errors[-1] < errors[0]
    assert all(b <= a * 1.02 for a, b in zip(errors, errors[1:])), errors


def test_finalisation_reduces_weighted_error():
    W, H = correlated_problem(48, 64, seed=2)
    base = DSFConfig(sparsity=0.5, outer_iters=10, finalize=False)
    L0, R0 = dsf_factorize(W, H, base)
    L1, R1 = dsf_factorize(W, H, base.model_copy(update={"finalize": True}))
    assert torch.equal(R0, R1)  # finalisation only refits L's values
    assert not bool(((L1 != 0) & (L0 == 0)).any())  # the mask of L is kept
    assert weighted_error(W, L1 @ R1, H) < weighted_error(W, L0 @ R0, H)


@pytest.mark.parametrize("shape", [(48, 64), (64, 48)])
def test_finalisation_without_ridge_fits_the_true_objective_better(shape):
    """The paper's refit has no ridge; a ridge biases the values away from the
    H-weighted least-squares fit on L's mask."""
    W, H = correlated_problem(*shape, seed=4)
    config = DSFConfig(sparsity=0.5, outer_iters=10)
    assert config.finalize_ridge == 0.0
    L0, R0 = dsf_factorize(W, H, config)
    L1, R1 = dsf_factorize(W, H, config.model_copy(update={"finalize_ridge": 0.01}))
    assert torch.equal(R0, R1) and torch.equal(L0 != 0, L1 != 0)
    assert weighted_error(W, L0 @ R0, H) < weighted_error(W, L1 @ R1, H)


@pytest.mark.parametrize("shape", [(64, 64), (96, 48), (48, 96)])
def test_beats_one_matrix_pruning_at_equal_nonzeros(shape):
    W, H = correlated_problem(*shape, seed=3)
    L, R = dsf_factorize(W, H, preset("paper", sparsity=0.5))
    budget = split_budget(*shape, 0.5).total
    magnitude = W * topk_mask(W, budget)
    wanda = W * topk_mask(W * H.diagonal().sqrt()[None, :], budget)
    dsf_err = weighted_error(W, L @ R, H)
    assert dsf_err < 0.8 * weighted_error(W, wanda, H)
    assert dsf_err < 0.8 * weighted_error(W, magnitude, H)


def test_dead_inputs_and_zero_weights_stay_finite():
    W, H = correlated_problem(32, 40)
    H[:, :5] = 0
    H[:5, :] = 0  # inputs that never fire
    W[:3] = 0
    L, R = dsf_factorize(W, H, DSFConfig(sparsity=0.5, outer_iters=3, finalize_iters=3))
    assert torch.isfinite(L @ R).all()


def test_shape_mismatch_and_bad_settings():
    W, H = correlated_problem(16, 24)
    with pytest.raises(ValueError, match="H has shape"):
        dsf_factorize(W, H[:10, :10], DSFConfig())
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="sparsity"):
            preset("fast", sparsity=bad)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("turbo")


def test_random_square_mask_variant_is_fixed_and_worse():
    W, H = correlated_problem(64, 64, seed=4)
    adaptive = DSFConfig(sparsity=0.5, outer_iters=20)
    fixed = adaptive.model_copy(update={"square_mask": "random"})
    La, Ra = dsf_factorize(W, H, adaptive)
    Lf, Rf = dsf_factorize(W, H, fixed)
    b = split_budget(64, 64, 0.5)
    from dsf_runtime.converters.factorize import random_square_mask

    mask = random_square_mask(64, b.square, 0)
    assert int(mask.sum()) == b.square and bool(mask.diagonal().all())
    assert not bool(((Rf != 0) & ~mask).any())  # R (square here) stays inside the fixed mask
    assert weighted_error(W, La @ Ra, H) < weighted_error(W, Lf @ Rf, H)


def test_info_reports_errors_before_and_after_finalize():
    from dsf_runtime.converters.factorize import dsf_factorize_info

    W, H = correlated_problem(40, 56, seed=5)
    L, R, info = dsf_factorize_info(W, H, DSFConfig(sparsity=0.5, outer_iters=6))
    assert info["error_after_finalize"] < info["error_before_finalize"]
    assert info["error_after_finalize"] == pytest.approx(weighted_error(W, L @ R, H), rel=1e-3)
