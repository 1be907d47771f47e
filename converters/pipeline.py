"""The compress job end to end: dense model + text -> factors -> checkpoint."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dsf_runtime.checkpoint import DEFAULT_VALUE_DTYPE, is_dsf_checkpoint, remove_stale_temporaries
from dsf_runtime.converters.calibrate import CompressionResult, compress_parallel, compress_sequential
from dsf_runtime.converters.config import CALIB_PRESETS, CalibConfig, DSFConfig, preset
from dsf_runtime.data import calibration_text, sample_windows, tokenize
from dsf_runtime.converters.methods import make_method
from dsf_runtime.converters.pack import check_storage, write_packed
from dsf_runtime.converters.workers import import_ray, make_executor
from dsf_runtime.errors import ConfigError
from dsf_runtime.models import load_dense

log = logging.getLogger(__name__)

LOG_NAME = "compression_log.json"
SCHEDULES = {"sequential": compress_sequential, "parallel": compress_parallel}


@dataclass
class CompressJob:
    model: str
    out_dir: Path
    dsf: DSFConfig
    calib: CalibConfig
    method: str = "dsf"
    calib_files: list[str] | None = None
    device: str = "cpu"
    value_dtype: str = DEFAULT_VALUE_DTYPE
    fmt: str = "bitmap"
    overwrite: bool = False
    progress: bool = True
    resume: bool = True
    schedule: str = "sequential"  # or "parallel": every Gram from the dense model (calibrate.py)
    workers: int | None = None  # local Ray workers; None with no ray_address: in-process
    ray_address: str | None = None  # an existing Ray cluster
    cpus_per_task: int | None = None  # Ray: CPUs and threads per task (1); in-process: threads per matrix (all)

    @property
    def work_dir(self) -> Path:
        """Where finished layers of an interrupted run are kept."""
        return self.out_dir.with_name(f".{self.out_dir.name}.partial")

    def fingerprint(self) -> dict:
        return {
            "model": str(self.model),
            "method": self.method,
            "dsf": self.dsf.model_dump(),
            "calib": self.calib.model_dump(),
            "calib_files": [str(Path(f).resolve()) for f in self.calib_files or []],
            "schedule": self.schedule,
        }


def make_job(
    model: str,
    out_dir: str | os.PathLike,
    sparsity: float = 0.5,
    preset_name: str = "fast",
    calib_files: list[str] | None = None,
    device: str = "cpu",
    nsamples: int | None = None,
    seqlen: int | None = None,
    method: str = "dsf",
    dsf_overrides: dict | None = None,
    **options,
) -> CompressJob:
    """Build a validated job from CLI-style arguments (errors are ConfigError)."""
    dsf = preset(preset_name, sparsity=sparsity, **(dsf_overrides or {}))
    make_method(method, sparsity, dsf)  # validates the method name early
    calib_args = dict(CALIB_PRESETS[preset_name])
    if nsamples is not None:
        calib_args["nsamples"] = nsamples
    if seqlen is not None:
        calib_args["seqlen"] = seqlen
    try:
        calib = CalibConfig(**calib_args)
    except ValueError as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None
    check_storage(options.get("fmt", "bitmap"), options.get("value_dtype", DEFAULT_VALUE_DTYPE))
    schedule = options.get("schedule", "sequential")
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; choose {' or '.join(SCHEDULES)}")
    if options.get("workers") is not None or options.get("ray_address") is not None:
        import_ray()  # a missing Ray is one clear error before the model loads
    workers, cpus = options.get("workers"), options.get("cpus_per_task")
    if (workers is not None and workers < 1) or (cpus is not None and cpus < 1):
        raise ConfigError("--workers and --cpus-per-task must be at least 1")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is available")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (options.get("overwrite") and is_dsf_checkpoint(out)):
            raise ConfigError(
                f"{out} exists and is not empty; choose another directory (or --overwrite a DSF checkpoint)"
            )
    return CompressJob(model, out, dsf, calib, method, calib_files, device, **options)


def run_compress(job: CompressJob) -> tuple[Path, CompressionResult]:
    """Load, calibrate and compress layer by layer, pack, and save atomically.

    Finished layers are kept in ``job.work_dir`` until the checkpoint is written, so
    running the same job again after a crash resumes where it stopped."""
    remove_stale_temporaries(job.out_dir)
    model, tokenizer = load_dense(job.model)
    max_len = getattr(model.config, "max_position_embeddings", None)
    seqlen = min(job.calib.seqlen, max_len) if max_len else job.calib.seqlen
    ids = tokenize(tokenizer, calibration_text(job.calib_files))
    windows = sample_windows(ids, job.calib.nsamples, seqlen, job.calib.seed)
    log.info("calibrating on %d windows of %d tokens", *windows.shape)
    if not job.resume and job.work_dir.exists():
        shutil.rmtree(job.work_dir)
    executor = make_executor(job.workers, job.ray_address, job.cpus_per_task)
    log.info("schedule %s, factorizing %s", job.schedule, executor.label)
    try:
        result = SCHEDULES[job.schedule](
            model,
            windows,
            make_method(job.method, job.dsf.sparsity, job.dsf),
            batch_size=job.calib.batch_size,
            device=job.device,
            progress=job.progress,
            work_dir=job.work_dir,
            fingerprint=job.fingerprint(),
            executor=executor,
        )
    finally:
        executor.close()
    if result.resumed_layers:
        unit = "layers" if job.schedule == "sequential" else "matrices"
        log.warning("resumed: %d %s were taken from %s", result.resumed_layers, unit, job.work_dir)
    settings = {"calibration": {**job.calib.model_dump(), "seqlen": seqlen}, "schedule": job.schedule}
    if job.method == "dsf":
        settings.update(job.dsf.model_dump())
    log_json = json.dumps(
        {
            "seconds": result.seconds,
            "schedule": job.schedule,
            "executor": result.executor,
            "layers": [asdict(r) for r in result.reports],
        },
        indent=1,
    )
    out = write_packed(
        model,
        tokenizer,
        result.factors,
        job.out_dir,
        overwrite=job.overwrite,
        sparsity=job.dsf.sparsity,
        fmt=job.fmt,
        value_dtype=job.value_dtype,
        method=job.method,
        factorization=settings,
        extra_files={LOG_NAME: log_json},
    )
    shutil.rmtree(job.work_dir, ignore_errors=True)
    return out, result
