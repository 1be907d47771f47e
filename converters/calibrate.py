"""The one sequential calibration driver (SparseGPT-style, layer by layer).

Decoder layers are processed in order. For each layer: forward the calibration
activations through it with hooks accumulating the Gram matrix H = X^T X / n of every
compressible linear's input, factorize all of them, write the product back so the
layer behaves as compressed, and forward again to produce the next layer's inputs.
The algorithm itself is a pure function passed in (``factorize``); this module owns
hooks, devices and progress bars only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from dsf_runtime.errors import FactorizationError
from dsf_runtime.models import architecture_for

log = logging.getLogger(__name__)

FactorizeFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    nnz_left: int
    nnz_right: int
    rel_error: float  # H-weighted relative reconstruction error
    seconds: float


@dataclass
class CompressionResult:
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name -> (L, R) on CPU
    reports: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0


class _StopForward(Exception):
    pass


def _capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor]):
    """Run the model up to the first decoder layer; return per batch its hidden states
    and the keyword arguments (rotary embeddings, masks) it was called with."""
    hidden, kwargs_seen = [], []

    def grab(_module, args, kwargs):
        kwargs = dict(kwargs)
        hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        kwargs_seen.append(kwargs)
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return hidden, kwargs_seen


def _layer_out(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def compress_sequential(
    model: nn.Module,
    calib_ids: torch.Tensor,
    factorize: FactorizeFn,
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> CompressionResult:
    """Factorize every compressible linear of ``model`` given calibration windows
    ``calib_ids`` (nsamples, seqlen). The model is modified in place: each compressed
    weight is replaced by the dense product L @ R. Returns the factor pairs."""
    from dsf_runtime.converters.factorize import weighted_error

    start = time.perf_counter()
    arch = architecture_for(model.config.model_type)
    layers = model.get_submodule(arch.layers)
    model.eval()
    model.to(device)
    batches = [b.to(device) for b in calib_ids.split(batch_size)]
    hidden, layer_kwargs = _capture_layer_inputs(model, layers, batches)
    result = CompressionResult()

    bar = tqdm(range(len(layers)), desc="DSF layers", unit="layer", disable=not progress)
    for i in bar:
        layer = layers[i]
        linears = {name: layer.get_submodule(name) for name in arch.linears}
        grams = {name: torch.zeros(m.in_features, m.in_features, device=device) for name, m in linears.items()}
        counts = dict.fromkeys(linears, 0)

        def make_hook(name):
            def hook(_module, args):
                x = args[0].reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
                grams[name].addmm_(x.t(), x)
                counts[name] += x.shape[0]

            return hook

        handles = [m.register_forward_pre_hook(make_hook(name)) for name, m in linears.items()]
        try:
            for h, kw in zip(hidden, layer_kwargs):
                layer(h, **kw)
        finally:
            for handle in handles:
                handle.remove()

        for name, linear in linears.items():
            full = f"{arch.layers}.{i}.{name}"
            t0 = time.perf_counter()
            H = grams[name] / max(1, counts[name])
            W = linear.weight.data.float()
            L, R = factorize(W, H)
            if not (torch.isfinite(L).all() and torch.isfinite(R).all()):
                raise FactorizationError(f"{full}: factorization produced NaN or Inf")
            product = L @ R
            err = weighted_error(W, product, H)
            linear.weight.data.copy_(product.to(linear.weight.dtype))
            result.factors[full] = (L.cpu(), R.cpu())
            result.reports.append(
                LayerReport(full, tuple(W.shape), int((L != 0).sum()), int((R != 0).sum()), err, time.perf_counter() - t0)
            )
            log.info("%s %s rel.err %.4f (%.1fs)", full, tuple(W.shape), err, result.reports[-1].seconds)
        del grams
        hidden = [_layer_out(layer(h, **kw)) for h, kw in zip(hidden, layer_kwargs)]
        mean_err = sum(r.rel_error for r in result.reports[-len(linears):]) / len(linears)
        bar.set_postfix(err=f"{mean_err:.4f}")
    result.seconds = time.perf_counter() - start
    return result
