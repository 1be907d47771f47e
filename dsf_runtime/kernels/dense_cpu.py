"""Dense y = x W^T on CPU through the kernel library's dense_linear op, with the weight
kept in the narrowest form that holds it exactly.

A sparse model keeps some layers dense, above all the output layer (vocab x hidden:
49152 x 576 for SmolLM2). BLAS runs that tall, thin product single-threaded at about
half the memory bandwidth (MKL on AMD Zen 3: 12.5 GB/s at batch 1, and 2-6x slower than
this op at batches 2-64), which at decode costs as much as all sparse layers together.
The op reads W once per tile of 3 batch rows from L2, on every core.

At decode that read is the whole cost, so the weight is read in fewer bytes where no
value changes: bf16 where every fp32 weight is a bf16 number (a model loaded from bf16),
int8 with one fp32 scale per 32 columns where every weight is an int8 times its block's
scale (a model dequantized from a Q8_0 GGUF, as the embedded SmolLM2's output layer is:
1.125 bytes per weight instead of 4). The kernel widens each weight back to the same
fp32 value before the same FMAs, so the packed layer gives the fp32 layer's output.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dsf_runtime import settings
from dsf_runtime.kernels import cpu_bitmap, cpu_ops

Q8_BLOCK = 32  # columns per int8 scale (the kernel's kDenseQ8Block, GGUF's Q8_0 block)
_CHECK_ROWS = 4096  # rows per chunk of the exactness checks (bounds their scratch memory)


class PackedWeight(NamedTuple):
    """A dense weight as the op reads it: ``weight`` fp32, bf16 or int8 (rows, k) and, for
    int8, ``scales`` fp32 (rows, k / 32)."""

    weight: torch.Tensor
    scales: torch.Tensor | None

    @property
    def form(self) -> str:
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.int8: "int8 x scale/32"}[self.weight.dtype]

    @property
    def nbytes(self) -> int:
        extra = 0 if self.scales is None else self.scales.numel() * self.scales.element_size()
        return self.weight.numel() * self.weight.element_size() + extra


def usable(weight: torch.Tensor) -> bool:
    """Whether dense_linear runs this weight: fp32 on CPU, with the op library built."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and cpu_bitmap.build()


def linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., k) @ weight (rows, k)^T -> (..., rows); F.linear where the op does not apply.
    ``weight`` may be a packed form (bf16, or int8 with ``scales``) for fp32 ``x``."""
    if x.dtype != torch.float32 or not cpu_bitmap.build() or weight.device.type != "cpu":
        if scales is not None:
            weight = exact_fp32(PackedWeight(weight, scales))
        return F.linear(x, weight.to(x.dtype))
    y = cpu_ops.ops().dense_linear(x.reshape(-1, x.shape[-1]), weight, scales)  # (N, rows)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def exact_fp32(packed: PackedWeight) -> torch.Tensor:
    """The fp32 weight a packed form stands for."""
    w, s = packed
    if s is None:
        return w.float()
    rows, k = w.shape
    return (w.float().view(rows, k // Q8_BLOCK, Q8_BLOCK) * s.unsqueeze(2)).view(rows, k)


def _q8_chunk(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """int8 values and per-block scales giving back ``w`` (rows, k) bit for bit, or None.
    Each block's scale is its largest magnitude / 127 (Q8_0's choice); the check is
    the product the kernel forms, in fp32."""
    rows, k = w.shape
    blocks = w.view(rows, k // Q8_BLOCK, Q8_BLOCK)
    scale = blocks.abs().amax(dim=2) / 127  # (rows, k / 32); inf or nan where w has them
    if not bool(torch.isfinite(scale).all()):
        return None
    q = torch.where(scale.unsqueeze(2) > 0, blocks / scale.unsqueeze(2).clamp_min(torch.finfo(torch.float32).tiny), 0)
    q = q.round_()
    if not bool((q.abs() <= 127).all()) or not torch.equal(q * scale.unsqueeze(2), blocks):
        return None
    return q.to(torch.int8).view(rows, k), scale


def pack_exact(weight: torch.Tensor) -> PackedWeight:
    """The narrowest form of an fp32 ``weight`` (rows, k) that gives back every value
    exactly: int8 x a scale per 32 columns, else bf16, else fp32 itself."""
    w = weight.detach()
    if w.dtype != torch.float32 or w.dim() != 2 or w.numel() == 0:
        return PackedWeight(w, None)
    w = w.contiguous()
    if w.shape[1] % Q8_BLOCK == 0:
        parts = []
        for r in range(0, w.shape[0], _CHECK_ROWS):
            part = _q8_chunk(w[r : r + _CHECK_ROWS])
            if part is None:
                break
            parts.append(part)
        else:
            return PackedWeight(torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts]))
    bits = w.view(torch.int32)
    if all(bool((bits[r : r + _CHECK_ROWS] & 0xFFFF).eq(0).all()) for r in range(0, w.shape[0], _CHECK_ROWS)):
        return PackedWeight(w.to(torch.bfloat16), None)
    return PackedWeight(w, None)


class DenseOutput:
    """A bias-free fp32 output layer run by the op, its weight as ``packed`` (``form``
    says which: fp32, bf16 or int8 x scale/32; benchmarks print it)."""

    def __init__(self, packed: PackedWeight) -> None:
        self.packed = packed
        self.form = packed.form

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, *self.packed)


def dense_output(weight: torch.Tensor) -> DenseOutput | None:
    """The op for a bias-free layer of this weight, packed exactly (unless
    DSF_OUTPUT_PACKING=off), or None where the op does not run it (not fp32 on CPU)."""
    if not usable(weight):
        return None
    weight = weight.detach()
    return DenseOutput(
        pack_exact(weight) if settings.get("DSF_OUTPUT_PACKING") == "exact" else PackedWeight(weight, None)
    )


def output_layer(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """What to call for a model's output layer: a DenseOutput for a bias-free fp32
    nn.Linear on CPU, else the module itself."""
    if type(module) is nn.Linear and module.bias is None:
        run = dense_output(module.weight)
        if run is not None:
            return run
    return module


def output_form(module: nn.Module) -> str:
    """How the runner reads this output layer, for benchmark tables: the packed form the
    op reads, or the module's own weight dtype where the module runs itself."""
    run = output_layer(module)
    if isinstance(run, DenseOutput):
        return f"{run.form} (dense_linear)"
    weight = getattr(module, "weight", None)
    return f"{str(weight.dtype).removeprefix('torch.')} ({type(module).__name__})" if weight is not None else "module"
