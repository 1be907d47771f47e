"""A lean forward pass for LLaMA-family decoders with a static, slotted KV cache.

Why not `model.generate`: at SmolLM2 size Python overhead dominates, and the
serving engine needs requests of different lengths to decode together
(continuous batching). The runner reuses the model's own modules (embeddings,
norms, rotary embedding, projections, whatever backs them: DSFLinear or
nn.Linear, MLP) and only replaces the attention bookkeeping:

- the cache holds ``slots`` sequences of up to ``max_len`` tokens, shaped
  (layers, slots, kv_heads, max_len, head_dim) for keys and for values;
- active sequences live in slots 0..B-1, so a decode step reads plain views of
  the cache (no gather); when a sequence leaves, the last one moves into its slot.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dsf_runtime import settings
from dsf_runtime.cuda_graphs import GraphedDecode
from dsf_runtime.errors import UnsupportedModelError
from dsf_runtime.kernels import cpu_ops, dense_cpu
from dsf_runtime.linear import DSFLinear
from dsf_runtime.models import ARCHITECTURES

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)  # the architecture table's decoders (LLaMA-style attention)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q (B, H, T, d), k (B, KV, T, d); cos/sin (B, T, d)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


# The architecture table's RMSNorm and gated-MLP classes: weight * (x * rsqrt(mean(x^2) + eps))
# and down(act(gate(x)) * up(x)), as the fused MLP block op computes them.
_RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"})
_GATED_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP"})
_SILUS = frozenset({"SiLU", "SiLUActivation"})  # torch's and transformers' (F.silu)


def _fusable(norm: nn.Module, projections: list, dtype: torch.dtype) -> bool:
    """Whether a block's norm and projections are what the fused block ops compute: the
    architecture's RMSNorm, fp32 activations, bias-free DSF layers (factor pairs or one
    pruned matrix each) prepared on cpu-bitmap."""
    if (
        type(norm).__name__ not in _RMS_NORMS
        or dtype != torch.float32
        or not all(isinstance(p, DSFLinear) and p.bias is None for p in projections)
    ):
        return False
    for p in projections:
        if p._prepared is None:
            p.prepare(dtype)
    return all(p.backend_name == "cpu-bitmap" for p in projections)


def _bound_handles(projections: list) -> list[int] | None:
    """The projections' bound operands (R then L each; 0 for the R of a one-matrix layer),
    or None where one has none now (moved, re-prepared or not yet run): the caller then
    runs the modules."""
    handles = []
    for p in projections:
        prepared = p._prepared
        if prepared is None or not prepared[1].handle or (prepared[0] is not None and not prepared[0].handle):
            return None
        handles += (0 if prepared[0] is None else prepared[0].handle, prepared[1].handle)
    return handles


def _mlp_block(layer: nn.Module, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """x + mlp(post_attention_layernorm(x)) for one decoder layer: one op (mlp_block_bound)
    where the block is a gated SiLU MLP that _fusable accepts, the modules otherwise."""
    norm, mlp = layer.post_attention_layernorm, layer.mlp

    def modules(x: torch.Tensor) -> torch.Tensor:
        return x + mlp(norm(x))

    projections = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if (
        type(mlp).__name__ not in _GATED_MLPS
        or type(getattr(mlp, "act_fn", None)).__name__ not in _SILUS
        or not _fusable(norm, projections, dtype)
    ):
        return modules
    op = cpu_ops.ops().mlp_block_bound.default
    weight, eps = norm.weight, float(norm.variance_epsilon)

    def fused(x: torch.Tensor) -> torch.Tensor:
        handles = _bound_handles(projections)
        return modules(x) if handles is None else op(x, weight, eps, handles)

    return fused


class ModelRunner:
    """Prefill one sequence into a slot; decode one token for each of slots 0..B-1."""

    def __init__(
        self, model: nn.Module, slots: int, max_len: int | None = None, cuda_graphs: bool | None = None
    ) -> None:
        """``cuda_graphs``: replay decode steps from CUDA graphs on a CUDA model (default:
        the DSF_CUDA_GRAPHS setting, on); ignored elsewhere."""
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"the serving engine supports {', '.join(SUPPORTED_MODEL_TYPES)} decoders, not {config.model_type!r}"
            )
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.model = model
        self.config = config
        inner = model.model
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        self.lm_head = dense_cpu.output_layer(model.lm_head)  # the op for an fp32 output layer on CPU
        self.dtype = self.embed.weight.dtype
        self.mlp_blocks = [_mlp_block(layer, self.dtype) for layer in self.layers]  # x -> x + mlp(norm(x))
        first = self.layers[0].self_attn
        self.head_dim = first.head_dim
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.scaling = first.scaling
        limit = int(getattr(config, "max_position_embeddings", 2048) or 2048)
        window = self._sliding_window(config)
        if window is not None:
            limit = min(limit, window)  # within the window, full attention is exact
        self.max_len = min(limit, max_len) if max_len else min(limit, 2048)
        if max_len and max_len > limit:
            log.warning("max_len %d exceeds what the model supports; using %d", max_len, limit)
        self.slots = slots
        param = next(model.parameters())
        self.device = param.device
        shape = (len(self.layers), slots, self.n_kv, self.max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.attn_inputs = [self._attn_inputs(i) for i in range(len(self.layers))]
        self.decode_layers = [self._decode_layer(i) for i in range(len(self.layers))]
        if cuda_graphs is None:
            cuda_graphs = settings.get("DSF_CUDA_GRAPHS") == "on"
        self.graphs = (
            GraphedDecode(self.step, slots, self.max_len, self.device)
            if cuda_graphs and self.device.type == "cuda"
            else None
        )

    @staticmethod
    def _sliding_window(config) -> int | None:
        window = getattr(config, "sliding_window", None)
        if window is None:
            return None
        if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
            return None
        return int(window)

    def cache_bytes(self) -> int:
        return 2 * self.k_cache.numel() * self.k_cache.element_size()

    def _project(self, attn, h: torch.Tensor, pos: torch.Tensor):
        """h (B, T, hidden), pos (B, T) -> q (B, H, T, d), k and v (B, KV, T, d) with rotary applied."""
        B, T, _ = h.shape
        q = attn.q_proj(h).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        return q, k, v

    def _attn_inputs(self, i: int) -> Callable[..., torch.Tensor]:
        """Layer i's decode-step attention inputs, (x, cos, sin, pos, slots) -> q (B, H, 1, d)
        with k and v written into the cache: one op (attn_inputs_bound) where the norm and
        the bias-free q/k/v projections are what it computes, the modules otherwise."""
        layer = self.layers[i]
        attn, norm = layer.self_attn, layer.input_layernorm

        def modules(x, cos, sin, pos, slots):
            q, k, v = self._project(attn, norm(x), pos)
            q, k = _apply_rotary(q, k, cos, sin)
            self.k_cache[i, slots, :, pos] = k[:, :, 0]
            self.v_cache[i, slots, :, pos] = v[:, :, 0]
            return q

        projections = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj")]
        if not _fusable(norm, projections, self.dtype):
            return modules
        op = cpu_ops.ops().attn_inputs_bound.default
        weight, eps = norm.weight, float(norm.variance_epsilon)
        k_cache, v_cache = self.k_cache[i], self.v_cache[i]  # (slots, kv_heads, max_len, d) views
        heads, kv_heads = self.n_heads, self.n_kv

        def fused(x, cos, sin, pos, slots):
            handles = _bound_handles(projections)
            if handles is None:
                return modules(x, cos, sin, pos, slots)
            return op(x, weight, eps, handles, cos, sin, k_cache, v_cache, pos, heads, kv_heads)

        return fused

    def _decode_layer(self, i: int) -> Callable[..., torch.Tensor | None] | None:
        """Layer i's whole decode step, (x, cos, sin, pos) -> x, as one op (decode_layer_bound:
        attention inputs, attention over the cache, o_proj and residual, MLP block) where
        both block ops apply and o_proj is a bias-free DSF pair on cpu-bitmap; None
        otherwise. The step returns None when a projection has no bound operands now."""
        layer = self.layers[i]
        attn = layer.self_attn
        if self.attn_inputs[i].__name__ != "fused" or self.mlp_blocks[i].__name__ != "fused":
            return None
        if not _fusable(layer.input_layernorm, [attn.o_proj], self.dtype):
            return None
        mlp = layer.mlp
        projections = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        op = cpu_ops.ops().decode_layer_bound.default
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        norm_args = (
            norms[0].weight,
            float(norms[0].variance_epsilon),
            norms[1].weight,
            float(norms[1].variance_epsilon),
        )
        k_cache, v_cache = self.k_cache[i], self.v_cache[i]
        heads, kv_heads, scale = self.n_heads, self.n_kv, float(self.scaling)

        def fused(x, cos, sin, pos):
            handles = _bound_handles(projections)
            if handles is None:
                return None
            return op(x, *norm_args, handles, cos, sin, k_cache, v_cache, pos, heads, kv_heads, scale)

        return fused

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, hidden) -> logits (B, vocab) in fp32."""
        return self.lm_head(self.norm(x)).float()

    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        """Run the prompt ``ids`` into ``slot`` (overwriting it); logits of the last position (vocab,)."""
        T = len(ids)
        if not 0 < T <= self.max_len:
            raise ValueError(f"prompt of {T} tokens does not fit a context of {self.max_len}")
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        pos = torch.arange(T, device=self.device).unsqueeze(0)
        x = self.embed(tokens)  # (1, T, hidden)
        cos, sin = self.rotary(x, pos)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = self._project(attn, layer.input_layernorm(x), pos)
            q, k = _apply_rotary(q, k, cos, sin)
            self.k_cache[i, slot, :, :T] = k[0]
            self.v_cache[i, slot, :, :T] = v[0]
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling, enable_gqa=True)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(1, T, -1))
            x = self.mlp_blocks[i](x)
        return self._finish(x[0, -1:])[0]

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each of slots 0..B-1 at the given positions; logits (B, vocab)."""
        B = len(tokens)
        if B == 0 or B > self.slots or len(positions) != B:
            raise ValueError(f"decode needs 1..{self.slots} tokens with one position each")
        if max(positions) >= self.max_len:
            raise ValueError(f"position {max(positions)} is past the context of {self.max_len}")
        if min(positions) < 0:
            raise ValueError(f"position {min(positions)} is negative")
        if self.graphs is not None:
            return self.graphs(tokens, positions)
        tok = torch.tensor(tokens, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        return self.step(tok, pos, max(positions) + 1)

    def step(self, tok: torch.Tensor, pos: torch.Tensor, span: int) -> torch.Tensor:
        """The decode step on tensors: tok and pos (B,) for slots 0..B-1, attention over the
        first ``span`` cached positions (> every pos; later ones are masked) -> logits (B, vocab).
        Its shapes depend on B and span only, so a CUDA graph can record it (cuda_graphs)."""
        B = tok.shape[0]
        slots = torch.arange(B, device=self.device)
        mask = (torch.arange(span, device=self.device).unsqueeze(0) <= pos.unsqueeze(1)).view(B, 1, 1, span)
        x = self.embed(tok.unsqueeze(1))  # (B, 1, hidden)
        cos, sin = self.rotary(x, pos.unsqueeze(1))
        for i, layer in enumerate(self.layers):
            step = self.decode_layers[i]
            y = step(x, cos, sin, pos) if step is not None else None
            if y is not None:
                x = y
                continue
            attn = layer.self_attn
            q = self.attn_inputs[i](x, cos, sin, pos, slots)  # k and v go into the cache
            keys = self.k_cache[i, :B, :, :span]
            values = self.v_cache[i, :B, :, :span]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=True)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(B, 1, -1))
            x = self.mlp_blocks[i](x)
        return self._finish(x[:, 0])

    def clear(self, slot: int | None = None) -> None:
        """Zero one slot's cache, or every slot's: masked attention multiplies stale positions by
        zero weights, so a NaN left there by a failed request would reach the next occupant."""
        if slot is None:
            self.k_cache.zero_()
            self.v_cache.zero_()
        else:
            self.k_cache[:, slot].zero_()
            self.v_cache[:, slot].zero_()

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` cached positions of slot ``src`` into slot ``dst``."""
        if src != dst and length > 0:
            self.k_cache[:, dst, :, :length] = self.k_cache[:, src, :, :length]
            self.v_cache[:, dst, :, :length] = self.v_cache[:, src, :, :length]


def eos_token_ids(model: nn.Module, tokenizer) -> set[int]:
    """Every id that ends a sequence: the generation config's, the model config's and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is not None:
            ids.update([value] if isinstance(value, int) else list(value))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
