"""Kernel backends: a registry of sparse-times-dense matmuls, keyed by name.

A backend ``prepare``s a factor's stored tensors once for a device (e.g. builds a
torch sparse CSR tensor), then ``matmul(prepared, x)`` computes x @ S^T for
x (N, cols) -> (N, rows). ``choose_backend`` picks the preferred available backend
for a (format, device) pair; the choice is always reported, never silently dense.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from dsf_runtime import settings
from dsf_runtime.errors import ConfigError


class Backend(Protocol):
    name: str
    formats: tuple[str, ...]
    devices: tuple[str, ...]  # torch device types, e.g. ("cpu", "cuda")
    priority: int  # higher wins in "auto"

    def available(self) -> bool: ...

    def prepare(
        self, fmt: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype
    ) -> Any: ...

    def matmul(self, prepared: Any, x: torch.Tensor) -> torch.Tensor: ...


BACKENDS: dict[str, Backend] = {}


def register_backend(cls: Callable[[], Backend]):
    """Class decorator: instantiate and register a backend under its ``name``."""
    instance = cls()
    BACKENDS[instance.name] = instance
    return cls


def disabled_backends() -> tuple[str, ...]:
    """The backends DSF_DISABLED_BACKENDS names (an unknown name there is an error)."""
    names = settings.get("DSF_DISABLED_BACKENDS") or ()
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ConfigError(
            f"DSF_DISABLED_BACKENDS names unknown backends {', '.join(unknown)}; known: {', '.join(sorted(BACKENDS))}"
        )
    return names


def can_run(
    backend: Backend, fmt: str, device: torch.device | str, tensors: dict[str, torch.Tensor] | None = None
) -> tuple[bool, str]:
    """Whether ``backend`` runs format ``fmt`` on ``device`` (and, given them, these stored
    tensors), and if not, why: what `dsf info` and a refused choice report."""
    device_type = torch.device(device).type
    if fmt not in backend.formats:
        return False, f"does not run the {fmt!r} format (runs {', '.join(backend.formats)})"
    if device_type not in backend.devices:
        return False, f"runs on {', '.join(backend.devices)}, not {device_type}"
    if backend.name in disabled_backends():
        return False, "disabled by DSF_DISABLED_BACKENDS"
    if not backend.available():
        why = getattr(backend, "unavailable_reason", None)
        return False, (why() if why is not None else None) or "not available here"
    check = getattr(backend, "accepts", None)
    if tensors is not None and check is not None and not check(tensors):
        return (
            False,
            f"does not take {tensors['values'].dtype} values" if "values" in tensors else "does not take these tensors",
        )
    return True, "ok"


def choose_backend(
    fmt: str, device: torch.device | str, requested: str = "auto", tensors: dict[str, torch.Tensor] | None = None
) -> Backend:
    """The backend to use for ``fmt`` on ``device``; ``requested`` may name one.
    ``tensors`` (a factor's stored tensors) lets a backend decline e.g. a value dtype."""
    device_type = torch.device(device).type
    if requested != "auto":
        if requested not in BACKENDS:
            raise ConfigError(f"unknown backend {requested!r}; known: {', '.join(sorted(BACKENDS))}")
        ok, why = can_run(BACKENDS[requested], fmt, device_type, tensors)
        if not ok:
            raise ConfigError(f"backend {requested!r} cannot run format {fmt!r} on {device_type}: {why}")
        return BACKENDS[requested]
    verdicts = {name: can_run(b, fmt, device_type, tensors) for name, b in BACKENDS.items()}
    candidates = [b for name, b in BACKENDS.items() if verdicts[name][0] and b.priority > 0]
    if not candidates:
        reasons = "; ".join(f"{name}: {why}" for name, (ok, why) in sorted(verdicts.items()) if not ok)
        raise ConfigError(f"no backend runs format {fmt!r} on {device_type} ({reasons})")
    return max(candidates, key=lambda b: b.priority)


def warm_backends() -> None:
    """Build what each backend needs (the CPU kernel's library) now rather than at the first
    matmul; a backend that builds may register faster format checks for validation."""
    for backend in BACKENDS.values():
        backend.available()


def backend_report(fmt: str, device: torch.device | str) -> list[tuple[str, int, bool, str]]:
    """(name, priority, can run, reason) of every backend for ``fmt`` on ``device``, best first."""
    rows = [(name, b.priority, *can_run(b, fmt, device)) for name, b in BACKENDS.items()]
    return sorted(rows, key=lambda r: (not r[2], -r[1]))


from dsf_runtime.kernels import (  # noqa: E402,F401  (registers the built-in backends)
    cpu_bitmap,
    cupy_bitmap,
    cupy_csr,
    dense_ref,
    torch_sparse,
    triton_bitmap,
)
