"""Measured kernel thresholds and launch settings, as data: kernels/tuning.json holds them
per CPU instruction path and per GPU model (with a default for GPUs not measured), and
says how each number was measured. Environment variables (dsf_runtime.settings) override."""

from __future__ import annotations

import functools
import json
from importlib import resources


@functools.cache
def table() -> dict:
    return json.loads((resources.files("dsf_runtime.kernels") / "tuning.json").read_text(encoding="utf-8"))


def cpu() -> dict:
    """The CPU kernel's thresholds: nz_min_batch and columns_max_batch per ISA, columns_max_density."""
    return table()["cpu"]


def gpu(name: str | None) -> dict:
    """The GPU kernel's settings for the GPU called ``name`` (torch.cuda.get_device_name), or the default."""
    entries = table()["gpu"]
    return entries.get(name or "", entries["default"])
