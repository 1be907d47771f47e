"""What the cupy backends share: whether cupy and a CUDA device are here (and why not),
zero-copy hand-off of torch tensors to cupy through DLPack, and running cupy work on
torch's current CUDA stream (so that it orders with torch's kernels and CUDA graphs can
record it). cupy is optional (the ``gpu`` extra, the wheel matching the user's CUDA):
nothing here imports it until a cupy backend runs."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from typing import Iterator

import torch

# torch dtypes cupy arrays can hold; bf16 (which numpy and cupy lack) travels as int16
# bits, to kernels that take it by pointer (cupy-bitmap), never to cuSPARSE
DLPACK_AS = {
    torch.float16: torch.float16,
    torch.float32: torch.float32,
    torch.float64: torch.float64,
    torch.int8: torch.int8,
    torch.int32: torch.int32,
    torch.int64: torch.int64,
    torch.bfloat16: torch.int16,
}


@functools.cache
def cupy_installed() -> bool:
    return importlib.util.find_spec("cupy") is not None


def unavailable_reason() -> str | None:
    """Why the cupy backends cannot run here, or None when they can."""
    if not cupy_installed():
        return (
            "cupy is not installed (pip install 'dsf-runtime[gpu]' and the cupy wheel for your CUDA, e.g. cupy-cuda12x)"
        )
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def handoff_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor as cupy will see it: contiguous, bf16 as int16 bits; a CUDA tensor only."""
    if t.device.type != "cuda":
        raise ValueError(f"cupy takes CUDA tensors, not {t.device.type} ones")
    if t.dtype not in DLPACK_AS:
        raise TypeError(f"no cupy hand-off for {t.dtype}")
    t = t.contiguous()
    return t if DLPACK_AS[t.dtype] == t.dtype else t.view(DLPACK_AS[t.dtype])


def to_cupy(t: torch.Tensor):
    """A cupy array sharing ``t``'s memory (see handoff_view); keep ``t`` alive while it is used."""
    import cupy

    return cupy.from_dlpack(handoff_view(t))


def to_torch(a) -> torch.Tensor:
    """A torch tensor sharing the cupy array's memory."""
    return torch.from_dlpack(a)


@contextlib.contextmanager
def on_torch_stream() -> Iterator[None]:
    """Run the enclosed cupy work on torch's current CUDA stream."""
    import cupy

    with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
        yield


class CupyBackend:
    """What a cupy backend answers the registry about where it runs."""

    devices = ("cuda",)

    def available(self) -> bool:
        return unavailable_reason() is None

    def unavailable_reason(self) -> str | None:
        return unavailable_reason()
