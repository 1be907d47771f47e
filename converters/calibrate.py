"""The calibration drivers: which Gram matrices each weight is compressed against.

``compress_sequential`` (SparseGPT-style, the paper's schedule): decoder layers in order.
For each layer, forward the calibration activations through it with hooks accumulating
the Gram matrix H = X^T X / n of every compressible linear's input, compress its
linears, write the products back so the layer behaves as compressed, and forward again
to produce the next layer's inputs, so each layer is fitted to its compressed inputs.

``compress_parallel``: every H is taken from the dense model in one pass, so all
matrices of the model can be factorized at once, at some quality cost (docs/distributed.md).

The method is a pure function passed in and an executor (workers.py: in-process or
Ray) runs it; this module owns hooks, devices, resumption and progress bars only.
Memory: the model stays on the CPU; only the decoder layer being processed and the
calibration activations live on ``device``. With a ``work_dir`` finished work is saved
(a layer at a time, or a matrix at a time in the parallel schedule), so a killed run
resumes where it stopped.
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

from dsf_runtime.converters.methods import Method
from dsf_runtime.converters.workers import Executor, LocalExecutor, MatrixResult, MatrixTask
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
    worker: str = ""  # host:pid of the process that factorized it
    overhead: float = 0.0  # seconds the executor added (Ray dispatch and transfer; 0 in-process)


@dataclass
class CompressionResult:
    factors: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)  # on CPU
    reports: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    resumed_layers: int = 0  # layers (sequential) or matrices (parallel) taken from the work directory
    executor: str = "in-process"


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

    def _files(self, stem: str) -> tuple[Path, Path]:
        return self.path / f"{stem}.safetensors", self.path / f"{stem}.json"

    def load(
        self, stem: str, names: list[str]
    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor | None]], list[LayerReport]] | None:
        """The saved factors of unit ``stem`` (a layer or one matrix) for the linears ``names``,
        or None when it must be computed: not saved yet, or its files are unreadable (then
        they are removed, with a warning)."""
        tensors_file, report_file = self._files(stem)
        if not (tensors_file.exists() and report_file.exists()):
            return None
        try:
            factors, reports = self._read(tensors_file, report_file)
            if sorted(factors) != sorted(names):
                raise ValueError(f"it holds {len(factors)} linears, the layer has {len(names)}")
        except Exception as exc:  # truncated or edited files: recompute rather than fail or trust them
            log.warning(
                "%s's saved factors in %s are unreadable (%s: %s); computing the layer again",
                stem,
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
        self, stem: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor | None]], reports: list[LayerReport]
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
        tensors_file, report_file = self._files(stem)
        save_file(tensors, str(tensors_file) + ".tmp")
        os.replace(str(tensors_file) + ".tmp", tensors_file)
        tmp_report = report_file.with_name(report_file.name + ".tmp")
        tmp_report.write_text(json.dumps({"shapes": shapes, "reports": [asdict(r) for r in reports]}))
        os.replace(tmp_report, report_file)


def _layer_stem(i: int) -> str:
    return f"layer_{i:04d}"


def _matrix_stem(name: str) -> str:
    return f"matrix_{name}"


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
    executor: Executor | None = None,
) -> CompressionResult:
    """Compress every compressible linear of ``model`` given calibration windows
    ``calib_ids`` (nsamples, seqlen). The model is modified in place: each compressed
    weight is replaced by its dense product. Returns the factors (CPU) and a report
    per linear. ``work_dir`` (with a ``fingerprint`` of the settings) enables resuming;
    ``executor`` runs the matrices of each layer (default: in this process)."""
    start = time.perf_counter()
    executor = executor or LocalExecutor()
    arch, layers, work, hidden, layer_kwargs = _begin(model, calib_ids, batch_size, device, work_dir, fingerprint)
    result = CompressionResult(executor=executor.label)

    bar = _matrix_bar(len(layers) * len(arch.linears), progress)
    for i in range(len(layers)):
        layer = layers[i].to(device)
        linears = {name: layer.get_submodule(name) for name in arch.linears}
        prefix = f"{arch.layers}.{i}"
        done = work.load(_layer_stem(i), [f"{prefix}.{name}" for name in linears]) if work is not None else None
        if done is not None:
            factors, reports = done
            for name, linear in linears.items():
                _write_product(linear, *factors[f"{prefix}.{name}"])
            result.resumed_layers += 1
            bar.update(len(linears))
        else:
            factors, reports = _compress_layer(
                layer, linears, arch.input_groups(), hidden, layer_kwargs, method, prefix, device, executor, bar
            )
            if work is not None:
                work.save(_layer_stem(i), factors, reports)
        result.factors.update(factors)
        result.reports.extend(reports)
        hidden = [_layer_out(layer(h, **kw)) for h, kw in zip(hidden, layer_kwargs)]
        layer.to("cpu")
        bar.set_postfix(err=f"{sum(r.rel_error for r in reports) / len(reports):.4f}")
    bar.close()
    result.seconds = time.perf_counter() - start
    _log_workers(result.reports)
    return result


@torch.no_grad()
def compress_parallel(
    model: nn.Module,
    calib_ids: torch.Tensor,
    method: Method,
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = True,
    work_dir: str | os.PathLike | None = None,
    fingerprint: dict | None = None,
    executor: Executor | None = None,
) -> CompressionResult:
    """As compress_sequential, but every Gram matrix comes from the dense model: one
    forward pass queues each layer's matrices as soon as its H exists, so all of them
    can run at once. Each finished matrix is saved on its own (resume per matrix)."""
    start = time.perf_counter()
    executor = executor or LocalExecutor()
    arch, layers, work, hidden, layer_kwargs = _begin(model, calib_ids, batch_size, device, work_dir, fingerprint)
    result = CompressionResult(executor=executor.label)
    finished: dict[str, tuple[tuple[torch.Tensor, torch.Tensor | None], LayerReport]] = {}
    weights: dict[str, nn.Linear] = {}

    bar = _matrix_bar(len(layers) * len(arch.linears), progress)
    for i in range(len(layers)):
        layer = layers[i].to(device)
        prefix = f"{arch.layers}.{i}"
        linears = {name: layer.get_submodule(name) for name in arch.linears}
        weights.update((f"{prefix}.{name}", linear) for name, linear in linears.items())
        todo = {}
        for name, linear in linears.items():
            full = f"{prefix}.{name}"
            saved = work.load(_matrix_stem(full), [full]) if work is not None else None
            if saved is None:
                todo[name] = linear
            else:
                finished[full] = (saved[0][full], saved[1][0])
                result.resumed_layers += 1
                bar.update(1)
        if todo:  # H of every group, including those whose matrices are all saved: the pass is shared
            grams = _layer_grams(layer, linears, arch.input_groups(), hidden, layer_kwargs, device)
            _submit(executor, method, todo, arch.input_groups(), grams, prefix)
            del grams
        hidden = [_layer_out(layer(h, **kw)) for h, kw in zip(hidden, layer_kwargs)]  # the dense layer's output
        layer.to("cpu")
    del hidden, layer_kwargs
    for res in executor.results():
        factors, report = _accept(res, weights[res.name].weight.shape)
        finished[res.name] = (factors, report)
        if work is not None:
            work.save(_matrix_stem(res.name), {res.name: factors}, [report])
        bar.update(1)
    bar.close()
    for full, linear in weights.items():  # model order
        (L, R), report = finished[full]
        _write_product(linear, L, R)
        result.factors[full] = (L, R)
        result.reports.append(report)
    result.seconds = time.perf_counter() - start
    _log_workers(result.reports)
    return result


def _write_product(linear: nn.Linear, L: torch.Tensor, R: torch.Tensor | None) -> None:
    """Make ``linear`` behave as compressed: its weight becomes L @ R (or L alone)."""
    linear.weight.data.copy_((L if R is None else L @ R).to(linear.weight.dtype))


def _begin(model: nn.Module, calib_ids: torch.Tensor, batch_size: int, device, work_dir, fingerprint):
    """(architecture, decoder layers, work dir or None, first-layer inputs, their kwargs)."""
    arch = architecture_for(model.config.model_type)
    layers = model.get_submodule(arch.layers)
    model.eval()
    model.to("cpu")
    work = _WorkDir(Path(work_dir), fingerprint or {}) if work_dir is not None else None
    hidden, layer_kwargs = _capture_layer_inputs(model, layers, list(calib_ids.split(batch_size)))
    return arch, layers, work, [_to(h, device) for h in hidden], [_to(kw, device) for kw in layer_kwargs]


def _matrix_bar(total: int, progress: bool):
    return tqdm(total=total, desc="compressing matrices", unit="matrix", disable=not progress, smoothing=0.1)


def worker_summary(reports: list[LayerReport]) -> list[str]:
    """Per-worker throughput, a line each: matrices, busy seconds, weights per second."""
    per: dict[str, list[LayerReport]] = {}
    for r in reports:
        per.setdefault(r.worker or "resumed", []).append(r)
    lines = []
    for worker, rs in sorted(per.items()):
        busy = sum(r.seconds for r in rs)
        weights = sum(r.shape[0] * r.shape[1] for r in rs)
        lines.append(
            f"worker {worker}: {len(rs)} matrices, {busy:.1f}s busy, {weights / max(busy, 1e-9):,.0f} weights/s"
        )
    return lines


def _log_workers(reports: list[LayerReport]) -> None:
    for line in worker_summary(reports):
        log.info(line)


def _layer_grams(layer, linears, groups, hidden, layer_kwargs, device) -> dict[str, torch.Tensor]:
    """H = X^T X / n for every group of linears that read the same input (e.g. q/k/v),
    keyed by the group's first linear, from one pass of the calibration inputs."""
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
    return {key: H / max(1, counts[key]) for key, H in grams.items()}


def _submit(executor: Executor, method: Method, linears: dict, groups, grams: dict, prefix: str) -> None:
    group_of = {name: g[0] for g in groups for name in g}
    tasks = [
        MatrixTask(f"{prefix}.{name}", linear.weight.data.float(), f"{prefix}.{group_of[name]}")
        for name, linear in linears.items()
    ]
    executor.submit(method, tasks, {f"{prefix}.{key}": H for key, H in grams.items()})


def _accept(res: MatrixResult, shape) -> tuple[tuple[torch.Tensor, torch.Tensor | None], LayerReport]:
    """A finished matrix's factors and report, or FactorizationError naming it."""
    if not res.finite:
        raise FactorizationError(f"{res.name}: compression produced NaN or Inf (check the calibration data)")
    L, R = res.factors.L, res.factors.R
    nnz_r = 0 if R is None else int((R != 0).sum())
    report = LayerReport(
        res.name,
        tuple(shape),
        int((L != 0).sum()),
        nnz_r,
        res.rel_error,
        res.seconds,
        res.info,
        res.worker,
        res.overhead,
    )
    log.info(
        "%s %s rel.err %.4f %s (%.1fs on %s)", res.name, tuple(shape), res.rel_error, res.info, res.seconds, res.worker
    )
    return (L, R), report


def _compress_layer(
    layer, linears, groups, hidden, layer_kwargs, method: Method, prefix: str, device, executor=None, bar=None
):
    """Collect H for every linear of one layer in one pass (one H per group of linears
    that read the same input, e.g. q/k/v), then compress each linear."""
    executor = executor or LocalExecutor()
    grams = _layer_grams(layer, linears, groups, hidden, layer_kwargs, device)
    _submit(executor, method, linears, groups, grams, prefix)
    results = {}
    for res in executor.results():
        results[res.name] = res
        if bar is not None:
            bar.update(1)
    factors, reports = {}, []
    for name, linear in linears.items():  # layer order, whatever order they finished in
        full = f"{prefix}.{name}"
        (L, R), report = _accept(results[full], linear.weight.shape)
        _write_product(linear, L, R)
        factors[full] = (L, R)
        reports.append(report)
    return factors, reports
