"""Typed, validated settings of the DSF factorization and of the calibration run."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class DSFConfig(BaseModel):
    """Settings of Double Sparse Factorization for one weight matrix.

    Defaults are the paper's settings (the ``paper`` preset)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sparsity: float = Field(0.5, gt=0.0, lt=1.0, description="fraction of the dense weight count removed")
    outer_iters: int = Field(40, ge=1, description="alternating updates of the two factors")
    admm_iters: int = Field(5, ge=1, description="ADMM steps per factor update")
    mask_iters: int = Field(2, ge=1, description="first ADMM steps that re-select the mask")
    anneal_iters: int | None = Field(
        None, ge=1, description="warm-start penalty reaches 1 here; None: 37/40 of outer_iters"
    )
    ridge: float = Field(0.01, ge=0.0, description="ridge added to the normalised Gram, times its mean diagonal")
    finalize: bool = Field(True, description="refit the second factor's values for the true objective")
    finalize_iters: int = Field(20, ge=1)
    finalize_ridge: float = Field(
        0.0,
        ge=0.0,
        description="ridge of the finalisation refit; the paper's refit has none (it fits the true objective)",
    )
    square_density: float | None = Field(None, gt=0.0, le=1.0, description="None: 0.16 for square W, 0.25 otherwise")
    square_mask: Literal["adaptive", "random"] = Field(
        "adaptive",
        description="random: the paper's ablation with a fixed random mask (diagonal included) for the square factor",
    )
    seed: int = 0
    dtype: Literal["float32", "float64"] = "float32"

    @property
    def anneal(self) -> int:
        return self.anneal_iters if self.anneal_iters is not None else max(1, round(self.outer_iters * 37 / 40))


PRESETS: dict[str, dict] = {
    "paper": {},
    "fast": {"outer_iters": 12, "finalize_iters": 10},
}


def preset(name: str, **overrides) -> DSFConfig:
    """A named preset with optional overrides (e.g. sparsity)."""
    from dsf_runtime.errors import ConfigError

    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    try:
        return DSFConfig(**{**PRESETS[name], **overrides})
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ConfigError(_one_line(exc)) from None


class CalibConfig(BaseModel):
    """How much calibration text the sequential driver feeds through the model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    nsamples: int = Field(128, ge=1)
    seqlen: int = Field(2048, ge=8)
    seed: int = 0
    batch_size: int = Field(8, ge=1)

    @field_validator("seqlen")
    @classmethod
    def _reasonable(cls, v: int) -> int:
        if v > 1 << 16:
            raise ValueError("seqlen above 65536 is not supported")
        return v


# The paper calibrates on 128 windows of the model's context length. On a 2-core CPU
# the two forward passes per layer over 128 x 2048 tokens alone take ~16 minutes for
# SmolLM2-135M, so the paper preset uses 128 windows of 512 tokens; --seqlen 2048
# restores the paper's amount of data.
CALIB_PRESETS: dict[str, dict] = {
    "paper": {"nsamples": 128, "seqlen": 512},
    "fast": {"nsamples": 32, "seqlen": 512},
}


def _one_line(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors()]
        return "invalid setting: " + "; ".join(parts)
    return str(exc).splitlines()[0]
