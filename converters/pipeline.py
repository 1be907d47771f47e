"""The compress job end to end: dense model + text -> DSF factors -> checkpoint."""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dsf_runtime.converters.calibrate import CompressionResult, compress_sequential
from dsf_runtime.converters.config import CALIB_PRESETS, CalibConfig, DSFConfig, preset
from dsf_runtime.converters.data import calibration_text, sample_windows, tokenize
from dsf_runtime.converters.factorize import dsf_factorize
from dsf_runtime.converters.pack import write_packed
from dsf_runtime.checkpoint import is_dsf_checkpoint
from dsf_runtime.errors import ConfigError
from dsf_runtime.models import load_dense

log = logging.getLogger(__name__)


@dataclass
class CompressJob:
    model: str
    out_dir: Path
    dsf: DSFConfig
    calib: CalibConfig
    calib_files: list[str] | None = None
    device: str = "cpu"
    value_dtype: str = "float16"
    fmt: str = "csr"
    overwrite: bool = False
    progress: bool = True


def make_job(
    model: str,
    out_dir: str | os.PathLike,
    sparsity: float = 0.5,
    preset_name: str = "fast",
    calib_files: list[str] | None = None,
    device: str = "cpu",
    nsamples: int | None = None,
    seqlen: int | None = None,
    **options,
) -> CompressJob:
    """Build a validated job from CLI-style arguments (errors are ConfigError)."""
    dsf = preset(preset_name, sparsity=sparsity)
    calib_args = dict(CALIB_PRESETS[preset_name])
    if nsamples is not None:
        calib_args["nsamples"] = nsamples
    if seqlen is not None:
        calib_args["seqlen"] = seqlen
    try:
        calib = CalibConfig(**calib_args)
    except ValueError as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is available")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (options.get("overwrite") and is_dsf_checkpoint(out)):
            raise ConfigError(f"{out} exists and is not empty; choose another directory (or --overwrite a DSF checkpoint)")
    return CompressJob(model, out, dsf, calib, calib_files, device, **options)


def run_compress(job: CompressJob) -> tuple[Path, CompressionResult]:
    """Load, calibrate and factorize layer by layer, pack, and save atomically."""
    model, tokenizer = load_dense(job.model)
    max_len = getattr(model.config, "max_position_embeddings", None)
    seqlen = min(job.calib.seqlen, max_len) if max_len else job.calib.seqlen
    ids = tokenize(tokenizer, calibration_text(job.calib_files))
    windows = sample_windows(ids, job.calib.nsamples, seqlen, job.calib.seed)
    log.info("calibrating on %d windows of %d tokens", *windows.shape)
    factorize = functools.partial(dsf_factorize, config=job.dsf)
    result = compress_sequential(
        model, windows, factorize, batch_size=job.calib.batch_size, device=job.device, progress=job.progress
    )
    model.to("cpu")
    out = write_packed(
        model,
        tokenizer,
        result.factors,
        job.out_dir,
        overwrite=job.overwrite,
        sparsity=job.dsf.sparsity,
        fmt=job.fmt,
        value_dtype=job.value_dtype,
        method="dsf",
        factorization={**job.dsf.model_dump(), "calibration": {**job.calib.model_dump(), "seqlen": seqlen}},
    )
    return out, result
