"""Kernel backends: a registry of sparse-times-dense matmuls, keyed by name.

A backend ``prepare``s a factor's stored tensors once for a device (e.g. builds a
torch sparse CSR tensor), then ``matmul(prepared, x)`` computes x @ S^T for
x (N, cols) -> (N, rows). ``choose_backend`` picks the preferred available backend
for a (format, device) pair; the choice is always reported, never silently dense.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from dsf_runtime.errors import ConfigError


class Backend(Protocol):
    name: str
    formats: tuple[str, ...]
    devices: tuple[str, ...]  # torch device types, e.g. ("cpu", "cuda")
    priority: int  # higher wins in "auto"

    def available(self) -> bool: ...

    def prepare(self, fmt: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype) -> Any: ...

    def matmul(self, prepared: Any, x: torch.Tensor) -> torch.Tensor: ...


BACKENDS: dict[str, Backend] = {}


def register_backend(cls: Callable[[], Backend]):
    """Class decorator: instantiate and register a backend under its ``name``."""
    instance = cls()
    BACKENDS[instance.name] = instance
    return cls


def _accepts(backend: Backend, tensors: dict[str, torch.Tensor] | None) -> bool:
    check = getattr(backend, "accepts", None)
    return tensors is None or check is None or check(tensors)


def choose_backend(
    fmt: str, device: torch.device | str, requested: str = "auto", tensors: dict[str, torch.Tensor] | None = None
) -> Backend:
    """The backend to use for ``fmt`` on ``device``; ``requested`` may name one.
    ``tensors`` (a factor's stored tensors) lets a backend decline e.g. a value dtype."""
    device_type = torch.device(device).type
    if requested != "auto":
        if requested not in BACKENDS:
            raise ConfigError(f"unknown backend {requested!r}; known: {', '.join(sorted(BACKENDS))}")
        backend = BACKENDS[requested]
        if fmt not in backend.formats or device_type not in backend.devices or not backend.available():
            raise ConfigError(f"backend {requested!r} cannot run format {fmt!r} on {device_type}")
        if not _accepts(backend, tensors):
            raise ConfigError(f"backend {requested!r} does not accept this checkpoint's values")
        return backend
    candidates = [
        b
        for b in BACKENDS.values()
        if fmt in b.formats and device_type in b.devices and b.priority > 0 and _accepts(b, tensors) and b.available()
    ]
    if not candidates:
        raise ConfigError(f"no backend runs format {fmt!r} on {device_type}")
    return max(candidates, key=lambda b: b.priority)


from dsf_runtime.kernels import cpu_bitmap, dense_ref, torch_sparse, triton_bitmap  # noqa: E402,F401  (registers the built-in backends)
