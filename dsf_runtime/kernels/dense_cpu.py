"""Dense fp32 y = x W^T on CPU through the kernel library's dense_linear op.

A sparse model keeps some layers dense, above all the output layer (vocab x hidden:
49152 x 576 for SmolLM2). BLAS runs that tall, thin product single-threaded at about
half the memory bandwidth (MKL on AMD Zen 3: 12.5 GB/s at batch 1, and 2-6x slower than
this op at batches 2-64), which at decode costs as much as all sparse layers together.
The op reads W once per tile of 3 batch rows from L2, on every core.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dsf_runtime.kernels import cpu_bitmap, cpu_ops


def usable(weight: torch.Tensor) -> bool:
    """Whether dense_linear runs this weight: fp32 on CPU, with the op library built."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and cpu_bitmap.build()


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., k) @ weight (rows, k)^T -> (..., rows); F.linear where the op does not apply."""
    if x.dtype != torch.float32 or not usable(weight):
        return F.linear(x, weight)
    y = cpu_ops.ops().dense_linear(x.reshape(-1, x.shape[-1]), weight)  # (N, rows)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def output_layer(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """What to call for a model's output layer: the op for a bias-free fp32 nn.Linear on
    CPU, else the module itself."""
    if type(module) is nn.Linear and module.bias is None and usable(module.weight):
        weight = module.weight
        return lambda x: linear(x, weight)
    return module
