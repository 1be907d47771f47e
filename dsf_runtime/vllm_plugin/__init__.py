"""vLLM plugin: vLLM serves DSF checkpoints with our kernels (out of tree, no fork).

vLLM calls ``register`` through the ``vllm.general_plugins`` entry point in every
process it starts. It registers the quantization method ``dsf``: a checkpoint's
config.json (``quantization_config.quant_method == "dsf"``) selects it, as does
``--quantization dsf``. Importing this package does not import vLLM.
"""

from __future__ import annotations

_REGISTERED = False


def register() -> None:
    """Register the ``dsf`` quantization method with vLLM (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from dsf_runtime.vllm_plugin import method  # noqa: F401  (registers on import)

    _REGISTERED = True
