"""One-matrix pruning baselines at the same nonzero budget as DSF: magnitude, Wanda,
SparseGPT (unstructured, or n:m such as 2:4). Pure functions (W, H) -> sparse W.

Each keeps at most floor((1 - sparsity) * out * in) nonzeros, the budget a DSF pair of
the same sparsity gets, so every method is compared at equal nonzero counts.
"""

from __future__ import annotations

import torch

from dsf_runtime.converters.factorize import topk_mask


def _check(W: torch.Tensor, H: torch.Tensor | None, sparsity: float) -> None:
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
    if H is not None and H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected ({W.shape[1]}, {W.shape[1]})")


def _nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest scores in every group of m consecutive inputs of a row."""
    out_f, in_f = scores.shape
    if in_f % m:
        raise ValueError(f"{n}:{m} sparsity needs in_features divisible by {m}, got {in_f}")
    groups = scores.reshape(out_f, in_f // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.reshape(out_f, in_f)


def magnitude_prune(
    W: torch.Tensor, H: torch.Tensor | None, sparsity: float, nm: tuple[int, int] | None = None
) -> torch.Tensor:
    """Keep the largest |W| of the whole layer (or n:m per group)."""
    _check(W, H, sparsity)
    if nm:
        return W * _nm_mask(W.abs(), *nm)
    return W * topk_mask(W, int((1.0 - sparsity) * W.numel()))


def wanda_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Wanda (Sun et al. 2024): score |W_ij| * ||X_j||, pruned per output row."""
    _check(W, H, sparsity)
    scores = W.abs() * H.diagonal().clamp_min(0).sqrt()[None, :]
    if nm:
        return W * _nm_mask(scores, *nm)
    keep_per_row = int((1.0 - sparsity) * W.shape[1])
    mask = torch.zeros_like(W, dtype=torch.bool)
    if keep_per_row:
        mask.scatter_(1, scores.topk(keep_per_row, dim=1).indices, True)
    return W * mask


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh 2023): prune columns left to right in blocks,
    choosing the mask by w^2 / [H^-1]_jj^2 and compensating each pruned weight by an
    optimal update of the not-yet-processed weights (OBS with the Cholesky factor of
    H^-1). Returns the pruned and updated W (same shape and dtype)."""
    _check(W, H, sparsity)
    out_f, in_f = W.shape
    if nm and (in_f % nm[1] or blocksize % nm[1]):
        raise ValueError(f"{nm[0]}:{nm[1]} sparsity needs in_features and blocksize divisible by {nm[1]}")
    Wf = W.detach().to(torch.float64).clone()  # (out, in); float64 keeps the updates stable
    Hf = H.detach().to(torch.float64).clone()
    dead = Hf.diagonal() == 0
    Hf[dead, dead] = 1.0
    Wf[:, dead] = 0.0
    Hf += damp * Hf.diagonal().mean() * torch.eye(in_f, dtype=Hf.dtype)
    # Upper Cholesky factor U of H^-1 (H^-1 = U^T U): row i holds the OBS update weights.
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(Hf))
    U = torch.linalg.cholesky(Hinv, upper=True)
    mask = torch.zeros_like(Wf, dtype=torch.bool)  # True = pruned
    for b0 in range(0, in_f, blocksize):
        b1 = min(b0 + blocksize, in_f)
        Wb = Wf[:, b0:b1].clone()
        Ub = U[b0:b1, b0:b1]
        diag = Ub.diagonal()
        errors = torch.zeros_like(Wb)
        if not nm:
            scores = Wb**2 / diag[None, :] ** 2
            n_keep = int((1.0 - sparsity) * Wb.numel())
            mask[:, b0:b1] = ~topk_mask(scores, n_keep) if n_keep < Wb.numel() else False
        for j in range(b1 - b0):
            if nm and j % nm[1] == 0:  # choose the group's mask once its columns are updated
                g = slice(j, j + nm[1])
                scores = Wb[:, g] ** 2 / diag[None, g] ** 2
                mask[:, b0 + j : b0 + j + nm[1]] = ~_nm_mask(scores, *nm)
            w = Wb[:, j]
            q = torch.where(mask[:, b0 + j], torch.zeros_like(w), w)
            err = (w - q) / diag[j]
            Wb[:, j:] -= err[:, None] * Ub[j, j:][None, :]
            Wb[:, j] = q
            errors[:, j] = err
        Wf[:, b0:b1] = Wb
        Wf[:, b1:] -= errors @ U[b0:b1, b1:]
    Wf[mask] = 0.0
    return Wf.to(W.dtype)


METHODS = {"magnitude": magnitude_prune, "wanda": wanda_prune, "sparsegpt": sparsegpt_prune}
