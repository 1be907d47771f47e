"""Where matrices are factorized: in this process, or as Ray tasks on a local or remote cluster.

A work unit is one weight matrix W with the Gram matrix H of its input: once H exists,
the matrices of a model are independent (q/k/v share one H, gate/up another). The
drivers in calibrate.py hand units to an executor and take back factors as units
finish; the executor never changes the result. ``factorize_matrix`` is the one function
that runs a unit, here or in a Ray worker, so both give bit-identical factors for the
same method and seed wherever the worker's torch runs with the same thread count.

Ray: every H goes into the object store once (``ray.put``) and is shared by the tasks
that read it; each task holds one matrix. Tasks ask for a GPU when the cluster has one,
else ``cpus_per_task`` CPUs, and set torch's threads to that share. A task that fails
(an exception or a dead worker) is retried (``max_retries``).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch

from dsf_runtime.converters.factorize import weighted_error
from dsf_runtime.converters.methods import Factors, Method
from dsf_runtime.errors import ConfigError

RAY_HINT = "pip install 'dsf-runtime[ray]'"


@dataclass
class MatrixTask:
    name: str  # the linear's full module name
    weight: torch.Tensor  # (out, in) float32
    gram: str  # key of its input's Gram matrix


@dataclass
class MatrixResult:
    name: str
    factors: Factors  # on the CPU
    rel_error: float  # H-weighted relative error of the factors' product
    finite: bool  # False: the method produced NaN or Inf (the driver raises, naming the matrix)
    seconds: float
    worker: str
    info: dict[str, float] = field(default_factory=dict)
    started: float = 0.0  # wall clock (time.time) on the worker
    overhead: float = 0.0  # seconds the executor added: dispatch to an idle worker + result transfer


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def factorize_matrix(method: Method, task: MatrixTask, H: torch.Tensor) -> MatrixResult:
    """Run ``method`` on one matrix and measure its error: pure apart from the clock."""
    started, start = time.time(), time.perf_counter()
    out = method(task.weight, H)
    product = out.product()
    finite = bool(torch.isfinite(product).all())
    err = weighted_error(task.weight, product, H) if finite else float("nan")
    factors = Factors(out.L.cpu(), None if out.R is None else out.R.cpu(), dict(out.info))
    seconds = time.perf_counter() - start
    return MatrixResult(task.name, factors, err, finite, seconds, worker_name(), dict(out.info), started)


class Executor(Protocol):
    label: str

    def submit(self, method: Method, tasks: list[MatrixTask], grams: dict[str, torch.Tensor]) -> None:
        """Queue matrices; ``grams`` holds every H the tasks name (it may be dropped afterwards)."""

    def results(self) -> Iterator[MatrixResult]:
        """Every queued matrix's result, in the order they finish, until none is queued."""

    def close(self) -> None: ...


class LocalExecutor:
    """Factorizes in this process, in submission order, when results are asked for;
    with ``threads``, torch runs each factorization on that many threads (as a Ray task
    with that many CPUs does, so both give the same factors bit for bit)."""

    def __init__(self, threads: int | None = None) -> None:
        self._queue: list[tuple[Method, MatrixTask, torch.Tensor]] = []
        self._threads = threads
        self.label = "in-process" + (f" ({threads} thread(s) per matrix)" if threads else "")

    def submit(self, method: Method, tasks: list[MatrixTask], grams: dict[str, torch.Tensor]) -> None:
        self._queue.extend((method, t, grams[t.gram]) for t in tasks)

    def results(self) -> Iterator[MatrixResult]:
        while self._queue:
            method, task, H = self._queue.pop(0)
            if not self._threads:
                yield factorize_matrix(method, task, H)
                continue
            threads = torch.get_num_threads()
            torch.set_num_threads(self._threads)
            try:
                result = factorize_matrix(method, task, H)
            finally:
                torch.set_num_threads(threads)
            yield result

    def close(self) -> None:
        self._queue.clear()


def _ray_task(method: Method, task: MatrixTask, H: torch.Tensor, threads: int, use_gpu: bool) -> MatrixResult:
    """The Ray task body: one matrix, torch on the task's CPU share (or its GPU)."""
    torch.set_num_threads(max(1, threads))
    if use_gpu and torch.cuda.is_available():
        task = MatrixTask(task.name, task.weight.cuda(), task.gram)
        H = H.cuda()
    return factorize_matrix(method, task, H)


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(f"distributed compression (--workers / --ray-address) needs Ray: {RAY_HINT}") from None
    return ray


class RayExecutor:
    """Factorizes as Ray tasks: ``workers`` local CPUs (a private local cluster), or the
    cluster at ``address``. Larger matrices are submitted first (they bound the wall time)."""

    def __init__(
        self, workers: int | None = None, address: str | None = None, cpus_per_task: int = 1, max_retries: int = 2
    ):
        ray = import_ray()
        if workers is not None and workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {workers}")
        if cpus_per_task < 1:
            raise ConfigError(f"--cpus-per-task must be at least 1, got {cpus_per_task}")
        self._ray = ray
        self._owns_cluster = not ray.is_initialized()
        if self._owns_cluster:
            options = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            if address is None:
                options["num_cpus"] = (workers or 1) * cpus_per_task
            try:
                ray.init(address=address, **options)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise ConfigError(f"cannot reach the Ray cluster at {address!r}: {str(exc).splitlines()[0]}") from None
        gpus = ray.cluster_resources().get("GPU", 0)
        self._use_gpu = gpus >= 1
        self._threads = cpus_per_task
        resources = {"num_gpus": 1, "num_cpus": cpus_per_task} if self._use_gpu else {"num_cpus": cpus_per_task}
        self._remote = ray.remote(max_retries=max_retries, retry_exceptions=True, **resources)(_ray_task)
        self._pending: dict = {}  # object ref -> (matrix name, submission time)
        self._last_end: dict[str, float] = {}  # worker -> when its latest task ended
        where = address or f"local, {workers or 1} worker(s)"
        self.label = f"ray ({where}; {'1 GPU' if self._use_gpu else f'{cpus_per_task} CPU'} per task)"

    def submit(self, method: Method, tasks: list[MatrixTask], grams: dict[str, torch.Tensor]) -> None:
        ray = self._ray
        method_ref = ray.put(method)
        gram_refs = {key: ray.put(grams[key].cpu()) for key in {t.gram for t in tasks}}  # each H stored once
        for task in sorted(tasks, key=lambda t: -t.weight.numel()):
            cpu_task = MatrixTask(task.name, task.weight.cpu(), task.gram)
            ref = self._remote.remote(method_ref, cpu_task, gram_refs[task.gram], self._threads, self._use_gpu)
            self._pending[ref] = (task.name, time.time())

    def results(self) -> Iterator[MatrixResult]:
        ray = self._ray
        while self._pending:
            done, _ = ray.wait(list(self._pending), num_returns=1)
            name, submitted = self._pending.pop(done[0])
            try:
                res = ray.get(done[0])
            except ray.exceptions.RayError as exc:
                raise RuntimeError(f"{name}: its Ray task failed after retries: {exc}") from None
            ended = res.started + res.seconds
            ready = max(submitted, self._last_end.get(res.worker, submitted))  # when the task could have started
            res.overhead = max(0.0, res.started - ready) + max(0.0, time.time() - ended)
            self._last_end[res.worker] = ended
            yield res

    def close(self) -> None:
        for ref in list(self._pending):
            self._ray.cancel(ref, force=True)
        self._pending.clear()
        if self._owns_cluster:
            self._ray.shutdown()


def make_executor(
    workers: int | None = None, address: str | None = None, cpus_per_task: int | None = None
) -> LocalExecutor | RayExecutor:
    """In-process unless ``workers`` or ``address`` asks for Ray. ``cpus_per_task``: each
    Ray task's CPUs and threads (default 1); in-process, each factorization's threads
    (default: torch's, all cores)."""
    if workers is None and address is None:
        return LocalExecutor(cpus_per_task)
    return RayExecutor(workers, address, cpus_per_task or 1)
