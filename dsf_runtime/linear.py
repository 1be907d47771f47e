"""DSFLinear: a drop-in replacement for nn.Linear computing y = L (R x) + b sparsely."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dsf_runtime.formats import get_format, tensors_nbytes
from dsf_runtime.kernels import Backend, choose_backend


class SparseFactor(nn.Module):
    """One stored sparse matrix: its format's tensors as buffers (so they follow
    ``.to(device)`` and appear in the state dict as ``<factor>.<tensor name>``)."""

    def __init__(self, shape: tuple[int, int], fmt: str, nnz: int, value_dtype: torch.dtype, extra: dict | None = None):
        super().__init__()
        self.shape = tuple(shape)
        self.fmt = fmt
        self.nnz = nnz
        self.extra = dict(extra or {})  # format-specific counts, e.g. BSR's nblocks
        for name, spec in get_format(fmt).specs(self.shape, nnz, value_dtype, self.extra).items():
            self.register_buffer(name, torch.empty(spec.shape, dtype=spec.dtype))

    @classmethod
    def from_dense(cls, dense: torch.Tensor, fmt: str, value_dtype: torch.dtype, **options) -> "SparseFactor":
        tensors = get_format(fmt).pack(dense, value_dtype, **options)
        nnz = int((dense != 0).sum())
        factor = cls(tuple(dense.shape), fmt, nnz, value_dtype, get_format(fmt).extra(tensors))
        for name, tensor in tensors.items():
            setattr(factor, name, tensor)
        return factor

    @classmethod
    def from_tensors(
        cls, shape: tuple[int, int], fmt: str, tensors: dict[str, torch.Tensor], nnz: int
    ) -> "SparseFactor":
        """A factor holding already-stored tensors (e.g. a tensor-parallel rank's cut)."""
        factor = cls(tuple(shape), fmt, nnz, tensors["values"].dtype, get_format(fmt).extra(tensors))
        for name, tensor in tensors.items():
            setattr(factor, name, tensor)
        return factor

    def stored(self) -> dict[str, torch.Tensor]:
        return dict(self.named_buffers(recurse=False))

    def to_dense(self) -> torch.Tensor:
        return get_format(self.fmt).unpack(self.stored(), self.shape)

    def nbytes(self) -> int:
        return tensors_nbytes(self.stored())

    def extra_repr(self) -> str:
        rows, cols = self.shape
        density = self.nnz / max(1, rows * cols)
        return f"{rows}x{cols}, format={self.fmt}, nnz={self.nnz}, density={density:.3f}"


class DSFLinear(nn.Module):
    """y = L (R x) + b with R (rank x in) applied first and L (out x rank) second.

    With ``rank=None`` the layer holds one sparse matrix L (out x in) and computes
    y = L x + b: how one-matrix pruning baselines (SparseGPT, Wanda, magnitude) are
    stored and run, so every method is loaded and benchmarked the same way.
    The kernel backend is chosen per device when the layer is first run (or by
    ``set_backend``); its prepared operands are cached until the module moves."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int | None,
        fmt: str,
        nnz_left: int,
        nnz_right: int,
        value_dtype: torch.dtype,
        bias: bool = False,
        bias_dtype: torch.dtype = torch.float32,
        extra_left: dict | None = None,
        extra_right: dict | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        left_shape = (out_features, in_features if rank is None else rank)
        self.L = SparseFactor(left_shape, fmt, nnz_left, value_dtype, extra_left)
        self.R = None if rank is None else SparseFactor((rank, in_features), fmt, nnz_right, value_dtype, extra_right)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype), requires_grad=False) if bias else None
        self.requested_backend = "auto"
        self._backend: Backend | None = None
        self._prepared: tuple[Any, Any] | None = None

    @classmethod
    def from_factors(
        cls,
        L: torch.Tensor,
        R: torch.Tensor | None,
        bias: torch.Tensor | None,
        fmt: str = "bitmap",
        value_dtype: torch.dtype | None = None,
        **format_options,
    ) -> "DSFLinear":
        """Pack dense-with-zeros factors L (out x r), R (r x in) into a new layer;
        R=None packs a single sparse matrix L (out x in)."""
        if R is not None and L.shape[1] != R.shape[0]:
            raise ValueError(f"factor shapes do not chain: L {tuple(L.shape)}, R {tuple(R.shape)}")
        value_dtype = value_dtype or L.dtype
        in_features = L.shape[1] if R is None else R.shape[1]
        rank = None if R is None else L.shape[1]
        layer = cls(in_features, L.shape[0], rank, fmt, 0, 0, value_dtype, bias is not None)
        layer.L = SparseFactor.from_dense(L, fmt, value_dtype, **format_options)
        if R is not None:
            layer.R = SparseFactor.from_dense(R, fmt, value_dtype, **format_options)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    @property
    def fmt(self) -> str:
        return self.L.fmt

    @property
    def backend_name(self) -> str:
        return self._backend.name if self._backend is not None else f"{self.requested_backend} (not prepared)"

    def set_backend(self, name: str = "auto") -> None:
        self.requested_backend = name
        self._backend = None
        self._prepared = None

    def prepare(self, dtype: torch.dtype | None = None) -> None:
        """Choose the backend for the current device and build its operands once."""
        device = next(self.L.buffers()).device
        backend = choose_backend(self.fmt, device, self.requested_backend, self.L.stored())
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        right = None if self.R is None else backend.prepare(self.fmt, self.R.stored(), self.R.shape, dtype)
        self._prepared = (right, backend.prepare(self.fmt, self.L.stored(), self.L.shape, dtype))
        self._backend = backend

    @property
    def prepared_operands(self) -> tuple:
        """The backend's operands for R and L as built by prepare() (empty before it)."""
        return tuple(p for p in self._prepared or () if p is not None)

    def _apply(self, fn, *args, **kwargs):
        self._prepared = None  # device or dtype may change: rebuild lazily
        self._backend = None
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._prepared is None:
            self.prepare(x.dtype)
        right, left = self._prepared
        pair = getattr(self._backend, "pair", None) if right is not None else None  # L (R x) in one call
        if pair is not None:
            y = pair(right, left, x)  # (..., out), x of any leading dimensions
        else:
            h = x.reshape(-1, self.in_features)  # (N, in)
            if right is not None:
                h = self._backend.matmul(right, h)  # (N, rank)
            y = self._backend.matmul(left, h).reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def nbytes(self) -> int:
        extra = self.bias.numel() * self.bias.element_size() if self.bias is not None else 0
        return self.L.nbytes() + (self.R.nbytes() if self.R is not None else 0) + extra

    @property
    def nnz(self) -> int:
        return self.L.nnz + (self.R.nnz if self.R is not None else 0)

    def to_dense_weight(self) -> torch.Tensor:
        """The dense product L @ R (or L): for reference checks only."""
        left = self.L.to_dense().double()
        return (left if self.R is None else left @ self.R.to_dense().double()).float()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"{'single sparse matrix' if self.rank is None else f'rank={self.rank}'}, "
            f"format={self.fmt}, backend={self.backend_name}, bias={self.bias is not None}"
        )
