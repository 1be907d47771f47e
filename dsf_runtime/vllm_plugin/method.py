"""The ``dsf`` quantization config and linear method, on vLLM's out-of-tree quantization API.

create_weights registers one placeholder parameter per stored tensor of the layer's
factors (``L.bitmap``, ``R.values``, ...), so that vLLM's loader finds the checkpoint's
names, including through its merging of q/k/v and gate/up into one layer; their loader
keeps each loaded tensor by projection. process_weights_after_loading checks them,
cuts this rank's part (dsf_runtime.sharding) and prepares the kernel backend; apply
runs each projection's DSF pair and concatenates the outputs of merged layers. Under
tensor parallelism a column-split layer takes the ``gather`` cut where its ranks divide
evenly: each rank computes a block of every projection's h = R x, one all-gather
assembles them, and each rank applies its rows of L.
Layers the checkpoint did not compress stay vLLM's own. The output layer keeps vLLM's
weights (tied or not), and on CPU in fp32 runs on the same dense op as `dsf serve`'s, read
in the narrowest form that holds every weight exactly (kernels/dense_cpu.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_gather,
)
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, UnquantizedEmbeddingMethod
from vllm.model_executor.utils import set_weight_attrs

from dsf_runtime.checkpoint import DSFQuantConfig, parse_quant_config
from dsf_runtime.errors import CheckpointError
from dsf_runtime.kernels import dense_cpu
from dsf_runtime.vllm_plugin.parts import (
    column_bounds,
    expected_tensors,
    gathers,
    module_names,
    rank_part,
    split_of,
)

_QKV = {"q": 0, "k": 1, "v": 2}


@register_quantization_config("dsf")
class DSFConfig(QuantizationConfig):
    """A DSF checkpoint's quantization_config, validated by the same model as `dsf` loads."""

    def __init__(self, quant: DSFQuantConfig):
        super().__init__()
        self.quant = quant

    def get_name(self) -> str:
        return "dsf"

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70  # the Triton and cuSPARSE backends run from Volta on

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the section lives in config.json

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "DSFConfig":
        return cls(parse_quant_config(config, "config.json"))

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, ParallelLMHead):
            return DSFOutputMethod()
        if not isinstance(layer, LinearBase):
            return None  # embeddings stay vLLM's
        names = module_names(prefix, self.packed_modules_mapping, self.quant.modules)
        return UnquantizedLinearMethod() if names is None else DSFLinearMethod(self.quant, names)


class DSFLinearMethod(LinearMethodBase):
    """One vLLM linear layer backed by the DSF pairs of one or more checkpoint modules."""

    def __init__(self, quant: DSFQuantConfig, names: list[str]):
        self.quant = quant
        self.names = names  # checkpoint modules, in vLLM's shard order

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        entries = [self.quant.modules[n] for n in self.names]
        declared = (sum(e.out_features for e in entries), entries[0].in_features)
        if declared != (output_size, input_size) or any(e.in_features != input_size for e in entries):
            raise CheckpointError(
                f"{', '.join(self.names)}: the checkpoint declares {declared[0]}x{declared[1]}, "
                f"the model has {output_size}x{input_size}"
            )
        layer.dsf_split = split_of(output_partition_sizes, output_size, input_size_per_partition, input_size)
        rank, world = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        if getattr(layer, "disable_tp", False):
            rank, world = 0, 1
        if layer.dsf_split == "row":
            start = rank * input_size_per_partition
            layer.dsf_bounds = [(start, start + input_size_per_partition)] * len(entries)
        else:
            layer.dsf_bounds = [
                column_bounds(e.out_features, size, rank, world) for e, size in zip(entries, output_partition_sizes)
            ]
        layer.dsf_ranks = None  # the gather cut: each projection's block of the rank dimension
        if gathers(entries, layer.dsf_split, world):
            layer.dsf_ranks = [(rank * e.rank // world, (rank + 1) * e.rank // world) for e in entries]
        layer.dsf_world = world
        layer.dsf_params_dtype = params_dtype
        layer.dsf_loaded = {}  # (shard index, "L.bitmap", ...) -> tensor as loaded
        specs: dict[str, torch.dtype] = {}
        for entry in entries:
            specs.update({k: dtype for k, (_, dtype) in expected_tensors(entry, self.quant).items()})
        for side in sorted({k.split(".", 1)[0] for k in specs}):
            holder = nn.Module()
            for key, dtype in specs.items():
                if key.startswith(side + "."):
                    placeholder = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
                    set_weight_attrs(placeholder, {"weight_loader": self._loader(layer, key)})
                    holder.register_parameter(key.split(".", 1)[1], placeholder)
            layer.register_module(side, holder)

    def _loader(self, layer: nn.Module, key: str):
        def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
            shard_id = getattr(loaded, "shard_id", None) if shard_id is None else shard_id
            index = _QKV.get(shard_id, shard_id) if isinstance(shard_id, str) else (shard_id or 0)
            if not isinstance(index, int) or not 0 <= index < len(self.names):
                raise CheckpointError(f"{key}: vLLM loads shard {shard_id!r}; {layer.prefix} has {self.names}")
            if (index, key) in layer.dsf_loaded:
                raise CheckpointError(f"tensor {self.names[index]}.{key} is stored twice")
            layer.dsf_loaded[(index, key)] = loaded

        return load

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        device = next(layer.parameters()).device
        parts = []
        for index, (name, bounds) in enumerate(zip(self.names, layer.dsf_bounds)):
            tensors = {key: t for (i, key), t in layer.dsf_loaded.items() if i == index}
            ranks = layer.dsf_ranks[index] if layer.dsf_ranks else None
            got = rank_part(name, self.quant.modules[name], self.quant, tensors, layer.dsf_split, bounds, ranks=ranks)
            for part in got if isinstance(got, tuple) else (got,):
                part.to(device).prepare(layer.dsf_params_dtype)
                parts.append(part)
        # gather cut: [h block, rows of L] per projection; otherwise one pair per projection
        layer.dsf_parts = nn.ModuleList(parts)
        layer.dsf_loaded = {}

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        parts = layer.dsf_parts
        if layer.dsf_ranks:
            y = self._gathered(layer, x)
        else:
            y = parts[0](x) if len(parts) == 1 else torch.cat([part(x) for part in parts], dim=-1)
        return y if bias is None else y + bias

    @staticmethod
    def _gathered(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The gather cut: this rank's blocks of every projection's h, one all-gather, then
        each projection's rows of L on its whole h."""
        parts, world = layer.dsf_parts, layer.dsf_world
        blocks = [parts[i](x) for i in range(0, len(parts), 2)]  # (N, k_i) each
        widths = [b.shape[-1] for b in blocks]
        h = tensor_model_parallel_all_gather(torch.cat(blocks, dim=-1) if len(blocks) > 1 else blocks[0], dim=-1)
        h = h.view(*x.shape[:-1], world, sum(widths))  # rank-major: each rank's blocks side by side
        outs, offset = [], 0
        for i, width in enumerate(widths):
            whole = h[..., offset : offset + width].reshape(*x.shape[:-1], world * width)  # (N, r_i)
            outs.append(parts[2 * i + 1](whole))
            offset += width
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


class DSFOutputMethod(UnquantizedEmbeddingMethod):
    """vLLM's output layer (ParallelLMHead: its weights, loading and tying unchanged),
    computed on CPU in fp32 by dsf-runtime's dense op with the weight packed exactly, as
    `dsf serve` computes it; vLLM's own GEMM elsewhere (GPU, bf16 or fp16 models)."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.dsf_output = dense_cpu.dense_output(layer.weight)  # None unless fp32 on CPU
        if layer.dsf_output is None:
            super().process_weights_after_loading(layer)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        run = getattr(layer, "dsf_output", None)
        if run is None:
            return super().apply(layer, x, bias)
        y = run(x)
        return y if bias is None else y + bias


def output_form(model: nn.Module) -> str:
    """How a loaded vLLM model computes its output layer: the packed form dsf-runtime's op
    reads, or vLLM's method by name (for LLM.apply_model, which pickles it by reference)."""
    run = getattr(model.lm_head, "dsf_output", None)
    return run.form if run is not None else type(model.lm_head.quant_method).__name__
