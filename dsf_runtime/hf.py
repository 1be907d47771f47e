"""transformers integration: ``AutoModelForCausalLM.from_pretrained(dsf_checkpoint)``.

Importing dsf_runtime registers a quantization config and a quantizer under
quant_method "dsf" with transformers' public registration API. Before weights load,
the quantizer swaps every compressed nn.Linear of the meta-device skeleton for an
empty DSFLinear, so transformers reads the factors' tensors by name straight into
the sparse modules (no dense W is ever built); afterwards it validates every factor
(index ranges, offsets, counts, finite values) and prepares the kernel backend.
``dsf_runtime.load_model`` remains the direct path with the same checks.
Compressed-tensors sparse checkpoints are routed to a quantizer of ours (hf_ct).
"""

from __future__ import annotations

import logging


log = logging.getLogger(__name__)

_REGISTERED = False


def register() -> bool:
    """Register the "dsf" quantization method with transformers (idempotent).
    Returns False when this transformers has no registration API."""
    global _REGISTERED
    if _REGISTERED:
        return True
    try:
        from transformers.quantizers import HfQuantizer
        from transformers.quantizers.auto import (
            AUTO_QUANTIZATION_CONFIG_MAPPING,
            AUTO_QUANTIZER_MAPPING,
            register_quantization_config,
            register_quantizer,
        )
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError:  # pragma: no cover - very old transformers
        log.warning("this transformers has no quantizer registration API; use dsf_runtime.load_model")
        return False

    from dsf_runtime.checkpoint import finish_loaded_model, parse_quant_config, swap_in_dsf_modules

    class DSFQuantizationConfig(QuantizationConfigMixin):
        """transformers-side view of a checkpoint's quantization_config (validated)."""

        def __init__(self, **kwargs):
            kwargs.pop("quant_method", None)
            self.quant_method = "dsf"
            self.dsf = parse_quant_config({"quant_method": "dsf", **kwargs}, "config.json")

        def to_dict(self) -> dict:
            return self.dsf.model_dump()

        def to_diff_dict(self) -> dict:
            return self.to_dict()

    class DSFHfQuantizer(HfQuantizer):
        requires_calibration = True  # a DSF model must come from `dsf compress` / `dsf pack`

        def validate_environment(self, *args, **kwargs):
            return None

        def _process_model_before_weight_loading(self, model, **kwargs):
            dtype = kwargs.get("dtype") or next(model.parameters()).dtype
            swap_in_dsf_modules(model, self.quantization_config.dsf, dtype)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            finish_loaded_model(model)
            return model

        def is_serializable(self, *args, **kwargs) -> bool:
            return False  # save with dsf_runtime (save_checkpoint / dsf pack)

        @property
        def is_trainable(self) -> bool:
            return False

    if "dsf" not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config("dsf")(DSFQuantizationConfig)
    if "dsf" not in AUTO_QUANTIZER_MAPPING:
        register_quantizer("dsf")(DSFHfQuantizer)
    from dsf_runtime import hf_ct

    hf_ct.register(HfQuantizer, QuantizationConfigMixin, AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING)
    _REGISTERED = True
    return True
