"""Distributed compression: Ray workers give the factors of the in-process driver bit for
bit, for both schedules and any worker count; failed tasks and dead workers are retried;
a killed parallel run resumes per matrix; a missing Ray is one clear error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsf_runtime.cli import main
from dsf_runtime.converters.config import DSFConfig
from dsf_runtime.converters.methods import make_method
from dsf_runtime.converters.pipeline import make_job, run_compress
from dsf_runtime.converters.workers import LocalExecutor, MatrixTask, RayExecutor, factorize_matrix
from dsf_runtime.errors import ConfigError

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'dsf-runtime[ray]')")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module

ARGS = ["--sparsity", "0.5", "--nsamples", "4", "--seqlen", "32", "--outer-iters", "3"]


def _compress(model_dir: Path, out: Path, *extra: str) -> dict[str, torch.Tensor]:
    assert main(["compress", str(model_dir), str(out), *ARGS, *extra]) == 0
    return load_file(out / "model.safetensors")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def in_process(tiny_model_dir, tmp_path_factory):
    """The single-process driver's checkpoints, each factorization on one thread like each
    Ray task (--cpus-per-task 1): reductions split over more threads round differently."""
    root = tmp_path_factory.mktemp("inproc")
    threads = torch.get_num_threads()
    out = {
        s: _compress(tiny_model_dir, root / s, "--schedule", s, "--cpus-per-task", "1")
        for s in ("sequential", "parallel")
    }
    assert torch.get_num_threads() == threads  # restored after each matrix
    return out


@pytest.mark.parametrize("schedule", ["sequential", "parallel"])
def test_ray_workers_give_the_in_process_factors(schedule, in_process, tiny_model_dir, tmp_path):
    two = _compress(tiny_model_dir, tmp_path / "two", "--schedule", schedule, "--workers", "2")
    _same(two, in_process[schedule])
    log = json.loads((tmp_path / "two" / "compression_log.json").read_text())
    assert log["schedule"] == schedule and log["executor"].startswith("ray (local, 2 worker(s)")
    workers = {r["worker"] for r in log["layers"]}
    assert 1 <= len(workers) <= 2 and all(w and w != f"{os.uname().nodename}:{os.getpid()}" for w in workers)
    assert all(r["seconds"] > 0 for r in log["layers"])
    if schedule == "parallel":
        _same(_compress(tiny_model_dir, tmp_path / "one", "--schedule", schedule, "--workers", "1"), two)


def test_schedules_differ_after_the_first_layer(in_process):
    seq, par = in_process["sequential"], in_process["parallel"]
    layer0 = [k for k in seq if k.startswith("model.layers.0.") and k.endswith("values")]
    layer1 = [k for k in seq if k.startswith("model.layers.1.") and k.endswith("values")]
    assert layer0 and layer1
    assert all(torch.equal(seq[k], par[k]) for k in layer0)  # both see the dense model's first layer
    assert not all(seq[k].shape == par[k].shape and torch.equal(seq[k], par[k]) for k in layer1)


class Flaky:
    """A method whose first run anywhere raises and whose second kills its worker process."""

    def __init__(self, markers: Path):
        self.markers = markers
        self.inner = make_method("dsf", 0.5, DSFConfig(outer_iters=2))

    def _first(self, name: str) -> bool:
        try:
            os.close(os.open(self.markers / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False

    def __call__(self, W, H):
        if self._first("raised"):
            raise RuntimeError("injected failure")
        if self._first("died"):
            os._exit(1)  # the worker process dies mid-task
        return self.inner(W, H)


def test_failed_tasks_and_dead_workers_are_retried(tmp_path):
    torch.manual_seed(0)
    W, X = torch.randn(24, 16), torch.randn(64, 16)
    tasks = [MatrixTask(f"m{i}", W * (i + 1), "h") for i in range(3)]
    grams = {"h": X.t() @ X / 64}
    executor = RayExecutor(workers=2)
    try:
        executor.submit(Flaky(tmp_path), tasks, grams)
        results = {r.name: r for r in executor.results()}
    finally:
        executor.close()
    assert (tmp_path / "raised").exists() and (tmp_path / "died").exists()
    assert sorted(results) == ["m0", "m1", "m2"]
    reference = make_method("dsf", 0.5, DSFConfig(outer_iters=2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the tasks
    try:
        for task in tasks:
            expected = factorize_matrix(reference, task, grams["h"])
            assert torch.equal(results[task.name].factors.L, expected.factors.L)
            assert torch.equal(results[task.name].factors.R, expected.factors.R)
    finally:
        torch.set_num_threads(threads)


def test_local_executor_runs_in_submission_order():
    W, H = torch.eye(8), torch.eye(8)
    executor = LocalExecutor()
    executor.submit(make_method("magnitude", 0.5), [MatrixTask("a", W, "h"), MatrixTask("b", W, "h")], {"h": H})
    assert [r.name for r in executor.results()] == ["a", "b"] and list(executor.results()) == []


def test_parallel_run_killed_mid_way_resumes_per_matrix(tiny_model_dir, tmp_path):
    out = tmp_path / "ck"
    work = out.with_name(f".{out.name}.partial")
    code = (  # layer 1's matrices hang, so the kill lands after layer 0's are saved
        "import sys, time; from dsf_runtime.converters import workers as w; real = w.factorize_matrix\n"
        "def slow(m, task, H):\n    if '.1.' in task.name: time.sleep(60)\n    return real(m, task, H)\n"
        "w.factorize_matrix = slow\nfrom dsf_runtime.cli import main\n"
        "sys.exit(main(sys.argv[1:]))"
    )
    cmd = [sys.executable, "-c", code, "compress", str(tiny_model_dir), str(out), *ARGS, "--schedule", "parallel"]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 120
    while len(list(work.glob("matrix_model.layers.0.*.json"))) < 7:
        assert proc.poll() is None and time.monotonic() < end, "compress ended before layer 0 was saved"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert not out.exists()
    assert main(["compress", str(tiny_model_dir), str(out), *ARGS, "--schedule", "parallel"]) == 0
    assert not work.exists()
    fresh = _compress(tiny_model_dir, tmp_path / "fresh", "--schedule", "parallel")  # same threads as the runs above
    _same(load_file(out / "model.safetensors"), fresh)


def test_missing_ray_is_one_clear_error(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(ConfigError, match=r"needs Ray: pip install 'dsf-runtime\[ray\]'"):
        make_job(str(tiny_model_dir), tmp_path / "x", workers=2)


def test_bad_worker_settings_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="at least 1"):
        make_job(str(tiny_model_dir), tmp_path / "x", workers=0)
    with pytest.raises(ConfigError, match="unknown schedule"):
        make_job(str(tiny_model_dir), tmp_path / "x", schedule="eventual")


def test_resume_refuses_a_partial_run_of_the_other_schedule(tiny_model_dir, tmp_path):
    seq = make_job(str(tiny_model_dir), tmp_path / "ck", nsamples=4, seqlen=32, progress=False)
    seq.work_dir.mkdir(parents=True)
    (seq.work_dir / "job.json").write_text(json.dumps(seq.fingerprint(), sort_keys=True))
    par = make_job(str(tiny_model_dir), tmp_path / "ck", nsamples=4, seqlen=32, progress=False, schedule="parallel")
    with pytest.raises(ConfigError, match="other settings"):
        run_compress(par)
