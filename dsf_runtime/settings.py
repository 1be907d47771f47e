"""Every environment variable dsf-runtime reads, in one table: name, meaning, valid values.

Values are read when asked for (a kernel's settings when a model is loaded, not at
import) and validated here, so a bad value is one clear error naming the variable.
`dsf info --settings` prints the table with the values in force; docs/settings.md is
the same table for readers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dsf_runtime.errors import ConfigError


@dataclass(frozen=True)
class Setting:
    name: str
    kind: str  # "path", "choice", "int", "float", "list", "secret"
    help: str
    default: str = ""  # as written in the environment; "" means unset
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting(
            "DSF_CACHE_DIR",
            "path",
            "where converted embedded models and built kernels are cached "
            "(default: $XDG_CACHE_HOME/dsf-runtime or ~/.cache/dsf-runtime)",
        ),
        Setting(
            "DSF_CPU_ISA",
            "choice",
            "a narrower CPU kernel path than the widest the CPU has (avx512 also turns off the bf16 dot-product path)",
            choices=("avx512", "avx2", "portable"),
        ),
        Setting(
            "DSF_AVX512_WIDTH",
            "choice",
            "the AVX-512 word path's 512-bit or 256-bit form instead of the one measured faster at load",
            default="auto",
            choices=("auto", "512", "256"),
        ),
        Setting(
            "DSF_AMX",
            "choice",
            "the AMX tile path for bf16 factors: auto (where the CPU has AMX and the path passes its "
            "check at first use), off, or emulate (the same tiles in scalar code, any x86 CPU; for tests)",
            default="auto",
            choices=("auto", "off", "emulate"),
        ),
        Setting(
            "DSF_ROUND_X",
            "choice",
            "fp32 activations of bf16 factors rounded to bf16 on CPUs with AVX512_BF16: auto (the dot path "
            "from batch 2, the pair path where the plan times it faster) or off (fp32 x paths only)",
            default="auto",
            choices=("auto", "off"),
        ),
        Setting(
            "DSF_AMX_MIN_BATCH",
            "int",
            "the batch from which bf16 factors take the tile path, AMX or AVX512_BF16 pairs "
            "(default: where the plan times it faster than the nonzero path; kernels/tuning.json for emulated tiles)",
            minimum=1,
        ),
        Setting(
            "DSF_NZ_MIN_BATCH",
            "int",
            "the batch from which the CPU kernel's nonzero path runs "
            "(default: the per-ISA value in kernels/tuning.json)",
            minimum=1,
        ),
        Setting(
            "DSF_COLUMNS_MAX_DENSITY",
            "float",
            "factors at most this dense get column indices for the AVX2 "
            "column-index path (0: never; default in kernels/tuning.json)",
            minimum=0.0,
            maximum=1.0,
        ),
        Setting(
            "DSF_COLUMNS_MAX_BATCH",
            "int",
            "the largest batch the column-index path takes (0: never; default in kernels/tuning.json)",
            minimum=0,
        ),
        Setting(
            "DSF_DISABLED_BACKENDS",
            "list",
            "comma-separated kernel backends never chosen (e.g. cpu-bitmap); `dsf info` says which are disabled",
        ),
        Setting(
            "DSF_CUDA_GRAPHS",
            "choice",
            "on a CUDA model, replay decode steps from CUDA graphs (off: launch every kernel from Python)",
            default="on",
            choices=("on", "off"),
        ),
        Setting(
            "DSF_OUTPUT_PACKING",
            "choice",
            "the fp32 output layer on CPU read as int8 x block scale or bf16 where that form holds every weight "
            "exactly (off: read it in fp32)",
            default="exact",
            choices=("exact", "off"),
        ),
        Setting("DSF_API_KEY", "secret", "the API key `dsf serve` requires when --api-key is not given"),
    )
}


def raw(name: str) -> str | None:
    """The variable's text, or None when unset or empty."""
    if name not in SETTINGS:
        raise KeyError(f"{name} is not a dsf-runtime setting")
    return os.environ.get(name) or None


def get(name: str):
    """The variable's validated value (None when unset and without a default):
    str for path/choice/secret, int, float, or a tuple of names for lists."""
    setting = SETTINGS[name]
    text = raw(name) or setting.default or None
    if text is None:
        return None
    if setting.kind == "choice":
        if text not in setting.choices:
            raise ConfigError(f"{name} must be {_alternatives(setting.choices)}, not {text!r}")
        return text
    if setting.kind == "list":
        return tuple(part.strip() for part in text.split(",") if part.strip())
    if setting.kind in ("int", "float"):
        return _number(setting, text)
    return text


def _number(setting: Setting, text: str) -> int | float:
    try:
        value = int(text) if setting.kind == "int" else float(text)
    except ValueError:
        value = None
    low, high = setting.minimum, setting.maximum
    if value is None or value != value or (low is not None and value < low) or (high is not None and value > high):
        if setting.kind == "int":
            kind = "a positive integer" if low == 1 else "a non-negative integer"
        else:
            kind = f"a number in [{low:g}, {high:g}]"
        raise ConfigError(f"{setting.name} must be {kind}, not {text!r}")
    return value


def _alternatives(choices: tuple[str, ...]) -> str:
    return ", ".join(choices[:-1]) + " or " + choices[-1]


def cache_dir() -> Path:
    """Where converted embedded models and built kernels are cached."""
    root = get("DSF_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "dsf-runtime"
    )
    return Path(root)


def describe() -> list[dict]:
    """Each setting with its value in force (secrets masked): `dsf info --settings`."""
    rows = []
    for s in SETTINGS.values():
        value = raw(s.name)
        if value is not None and s.kind == "secret":
            value = "(set)"
        rows.append(
            {
                "name": s.name,
                "value": value,
                "default": s.default or None,
                "help": s.help,
                "choices": list(s.choices) or None,
            }
        )
    return rows
