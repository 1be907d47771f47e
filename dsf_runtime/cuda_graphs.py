"""Decode steps replayed from CUDA graphs, so that kernel launches do not hide the kernels.

A decode step launches a few kernels per layer; at batch 1 on a GPU each launch from
Python costs about as much as the kernel itself. A CUDA graph records the step once and
replays it with one launch. A graph fixes every shape and address, so:

- inputs go through static buffers (token ids and positions, ``slots`` long);
- the batch is padded to a power of two (padding rows decode token 0 at position 0 in
  free slots, which the next prefill there overwrites);
- attention covers a power-of-two span of cached positions (at least ``MIN_SPAN``),
  positions past each row's own masked, so a graph serves many steps;
- one graph per (batch bucket, span bucket), recorded the first time it is needed, right
  after that step ran eagerly (which also warms up Triton's compiler and cuBLAS).

If recording fails (an op that synchronises, e.g. a dynamic rotary scaling), the reason is
logged once and every later step runs eagerly: slower, never wrong.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)

MIN_SPAN = 64

Step = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (tok (B,), pos (B,), span) -> logits (B, vocab)
Recorder = Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], None], torch.Tensor]]


def bucket(n: int, limit: int, floor: int = 1) -> int:
    """The smallest power of two >= max(n, floor), at most ``limit`` (which must be >= n)."""
    size = 1 << (max(n, floor) - 1).bit_length()
    return min(size, limit)


def record_cuda(fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
    """Record ``fn()`` into a CUDA graph: (replay, the output tensor replays write)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


class GraphedDecode:
    """Runs ``step`` for (tokens, positions) of slots 0..B-1 by replaying recorded graphs."""

    def __init__(
        self, step: Step, slots: int, max_len: int, device: torch.device, record: Recorder = record_cuda
    ) -> None:
        self.step = step
        self.slots = slots
        self.max_len = max_len
        self.record = record
        self.tok = torch.zeros(slots, dtype=torch.long, device=device)  # static inputs
        self.pos = torch.zeros(slots, dtype=torch.long, device=device)
        self.graphs: dict[tuple[int, int], tuple[Callable[[], None], torch.Tensor]] = {}
        self.failed: str | None = None  # why recording stopped, once it failed

    def key(self, batch: int, positions: list[int]) -> tuple[int, int]:
        """(batch bucket, span bucket) of a step."""
        return bucket(batch, self.slots), bucket(max(positions) + 1, self.max_len, MIN_SPAN)

    def __call__(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """logits (B, vocab) of one decode step (a copy: the graph's output is reused)."""
        B = len(tokens)
        b, span = self.key(B, positions)
        pad = [0] * (b - B)
        host = torch.tensor([tokens + pad, positions + pad], dtype=torch.long)
        self.tok[:b].copy_(host[0])
        self.pos[:b].copy_(host[1])
        graph = self.graphs.get((b, span))
        if graph is not None:
            replay, out = graph
            replay()
            return out[:B].clone()
        tok, pos = self.tok[:b], self.pos[:b]
        logits = self.step(tok, pos, span)[:B].clone()  # eager: the step's result, and the warm-up
        if self.failed is None:
            try:
                self.graphs[(b, span)] = self.record(lambda: self.step(tok, pos, span))
            except Exception as exc:  # noqa: BLE001 - any failure means: run eagerly from now on
                self.failed = f"{type(exc).__name__}: {exc}"
                log.warning("decode runs without CUDA graphs: recording failed (%s)", self.failed)
        return logits
