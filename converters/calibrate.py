"""The one sequential calibration driver (SparseGPT-style, layer by layer).

Decoder layers are processed in order. For each layer: forward the calibration
activations through it with hooks accumulating the Gram matrix H = X^T X / n of every
compressible linear's input, compress all of them with the given method, write the
product back so the layer behaves as compressed, and forward again to produce the
next layer's inputs. The method is a pure function passed in; this module owns hooks,
devices, resumption and progress bars only.

Memory: the model stays on the CPU; only the decoder layer being processed and the
calibration activations live on ``device``. With a ``work_dir`` every finished layer's
factors are saved, so a killed run resumes after its last finished layer.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dsf_runtime.converters.factorize import weighted_error
from dsf_runtime.converters.methods import Factors, Method
from dsf_runtime.errors import ConfigError, FactorizationError
from dsf_runtime.formats import get_format
from dsf_runtime.models import architecture_for

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    nnz_left: int
    nnz_right: int
    rel_error: float  # H-weighted relative reconstruction error of the stored factors
    seconds: float
    info: dict[str, float] = field(default_factory=dict)  # method diagnostics


@dataclass
class CompressionResult:
    factors: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)  # on CPU
    reports: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    resumed_layers: int = 0


class _StopForward(Exception):
    pass


def _to(obj: Any, device) -> Any:
    """Move tensors inside nested tuples/lists/dicts to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


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


class _WorkDir:
    """Finished layers of an interrupted run: factors in CSR + a JSON report each."""

    def __init__(self, path: Path, fingerprint: dict):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        job = path / "job.json"
        if job.exists():
            try:
                stored = json.loads(job.read_text())
            except json.JSONDecodeError:
                stored = None
            if stored != fingerprint:
                raise ConfigError(
                    f"{path} holds a partial run with other settings; delete it (or run with --fresh) to start over"
                )
        else:
            job.write_text(json.dumps(fingerprint, sort_keys=True))

    def _files(self, i: int) -> tuple[Path, Path]:
        return self.path / f"layer_{i:04d}.safetensors", self.path / f"layer_{i:04d}.json"

    def load(
        self, i: int, names: list[str]
    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor | None]], list[LayerReport]] | None:
        """Layer ``i``'s saved factors for the linears ``names``, or None when it must be computed:
        not saved yet, or its files are unreadable (then they are removed, with a warning)."""
        tensors_file, report_file = self._files(i)
        if not (tensors_file.exists() and report_file.exists()):
            return None
        try:
            factors, reports = self._read(tensors_file, report_file)
            if sorted(factors) != sorted(names):
                raise ValueError(f"it holds {len(factors)} linears, the layer has {len(names)}")
        except Exception as exc:  # truncated or edited files: recompute rather than fail or trust them
            log.warning(
                "layer %d's saved factors in %s are unreadable (%s: %s); computing the layer again",
                i,
                self.path,
                type(exc).__name__,
                exc,
            )
            tensors_file.unlink(missing_ok=True)
            report_file.unlink(missing_ok=True)
            return None
        return factors, reports

    @staticmethod
    def _read(tensors_file: Path, report_file: Path):
        from safetensors.torch import load_file

        meta = json.loads(report_file.read_text())
        tensors = load_file(tensors_file)
        csr = get_format("csr")
        factors = {}
        for name, shapes in meta["shapes"].items():
            parts = []
            for side, shape in zip(("L", "R"), shapes):
                if shape is None:
                    parts.append(None)
                    continue
                sub = {k: tensors[f"{name}.{side}.{k}"] for k in ("crow_indices", "col_indices", "values")}
                parts.append(csr.unpack(sub, tuple(shape)))
            factors[name] = (parts[0], parts[1])
        reports = [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in meta["reports"]]
        return factors, reports

    def save(
        self, i: int, factors: dict[str, tuple[torch.Tensor, torch.Tensor | None]], reports: list[LayerReport]
    ) -> None:
        from safetensors.torch import save_file

        csr = get_format("csr")
        tensors, shapes = {}, {}
        for name, (L, R) in factors.items():
            shapes[name] = [list(L.shape), None if R is None else list(R.shape)]
            for side, mat in (("L", L), ("R", R)):
                if mat is not None:
                    for k, t in csr.pack(mat, torch.float32).items():
                        tensors[f"{name}.{side}.{k}"] = t
        tensors_file, report_file = self._files(i)
        save_file(tensors, str(tensors_file) + ".tmp")
        os.replace(str(tensors_file) + ".tmp", tensors_file)
        tmp_report = report_file.with_name(report_file.name + ".tmp")
        tmp_report.write_text(json.dumps({"shapes": shapes, "reports": [asdict(r) for r in reports]}))
        os.replace(tmp_report, report_file)


@torch.no_grad()
def compress_sequential(
    model: nn.Module,
    calib_ids: torch.Tensor,
    method: Method,
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = True,
    work_dir: str | os.PathLike | None = None,
    fingerprint: dict | None = None,
) -> CompressionResult:
    """Compress every compressible linear of ``model`` given calibration windows
    ``calib_ids`` (nsamples, seqlen). The model is modified in place: each compressed
    weight is replaced by its dense product. Returns the factors (CPU) and a report
    per linear. ``work_dir`` (with a ``fingerprint`` of the settings) enables resuming."""
    start = time.perf_counter()
    arch = architecture_for(model.config.model_type)
    layers = model.get_submodule(arch.layers)
    model.eval()
    model.to("cpu")
    work = _WorkDir(Path(work_dir), fingerprint or {}) if work_dir is not None else None
    batches = list(calib_ids.split(batch_size))
    hidden, layer_kwargs = _capture_layer_inputs(model, layers, batches)
    hidden = [_to(h, device) for h in hidden]
    layer_kwargs = [_to(kw, device) for kw in layer_kwargs]
    result = CompressionResult()

    bar = tqdm(range(len(layers)), desc="compressing layers", unit="layer", disable=not progress)
    for i in bar:
        layer = layers[i].to(device)
        linears = {name: layer.get_submodule(name) for name in arch.linears}
        done = work.load(i, [f"{arch.layers}.{i}.{name}" for name in linears]) if work is not None else None
        if done is not None:
            factors, reports = done
            for name, linear in linears.items():
                L, R = factors[f"{arch.layers}.{i}.{name}"]
                linear.weight.data.copy_((L if R is None else L @ R).to(linear.weight.dtype))
            result.resumed_layers += 1
        else:
            factors, reports = _compress_layer(
                layer, linears, arch.input_groups(), hidden, layer_kwargs, method, f"{arch.layers}.{i}", device
            )
            if work is not None:
                work.save(i, factors, reports)
        result.factors.update(factors)
        result.reports.extend(reports)
        hidden = [_layer_out(layer(h, **kw)) for h, kw in zip(hidden, layer_kwargs)]
        layer.to("cpu")
        bar.set_postfix(err=f"{sum(r.rel_error for r in reports) / len(reports):.4f}")
    result.seconds = time.perf_counter() - start
    return result


def _compress_layer(layer, linears, groups, hidden, layer_kwargs, method: Method, prefix: str, device):
    """Collect H for every linear of one layer in one pass (one H per group of linears
    that read the same input, e.g. q/k/v), then compress each linear."""
    group_of = {name: g[0] for g in groups for name in g}
    grams = {g[0]: torch.zeros(linears[g[0]].in_features, linears[g[0]].in_features, device=device) for g in groups}
    counts = dict.fromkeys(grams, 0)

    def make_hook(name):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
            grams[name].addmm_(x.t(), x)
            counts[name] += x.shape[0]

        return hook

    handles = [linears[g[0]].register_forward_pre_hook(make_hook(g[0])) for g in groups]
    try:
        for h, kw in zip(hidden, layer_kwargs):
            layer(h, **kw)
    finally:
        for handle in handles:
            handle.remove()

    factors, reports = {}, []
    for name, linear in linears.items():
        full = f"{prefix}.{name}"
        t0 = time.perf_counter()
        key = group_of[name]
        H = grams[key] / max(1, counts[key])
        W = linear.weight.data.float()
        out: Factors = method(W, H)
        product = out.product()
        if not bool(torch.isfinite(product).all()):
            raise FactorizationError(f"{full}: compression produced NaN or Inf (check the calibration data)")
        err = weighted_error(W, product, H)
        linear.weight.data.copy_(product.to(linear.weight.dtype))
        factors[full] = (out.L.cpu(), None if out.R is None else out.R.cpu())
        nnz_r = 0 if out.R is None else int((out.R != 0).sum())
        reports.append(
            LayerReport(full, tuple(W.shape), int((out.L != 0).sum()), nnz_r, err, time.perf_counter() - t0, out.info)
        )
        log.info("%s %s rel.err %.4f %s (%.1fs)", full, tuple(W.shape), err, out.info, reports[-1].seconds)
    return factors, reports
