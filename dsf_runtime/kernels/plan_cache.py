"""Per-shape choices measured once: which of a few equivalent ways to run a call is
fastest here, cached by a key (shape and batch), so the first call of a kind pays for
the timing and every later one runs the winner."""

from __future__ import annotations

from typing import Callable, Hashable


class MeasuredPlan:
    """Picks, per key, the fastest of named alternatives by timing each with ``timer``."""

    def __init__(self, timer: Callable[[Callable[[], object]], float], default: str) -> None:
        self.timer = timer  # seconds (or any unit) one call of a thunk takes
        self.default = default  # taken when timing is not possible now (e.g. a CUDA graph records)
        self.choices: dict[Hashable, str] = {}
        self.timings: dict[Hashable, dict[str, float]] = {}

    def choose(self, key: Hashable, alternatives: dict[str, Callable[[], object]], can_time: bool = True) -> str:
        """The name of the fastest alternative for ``key`` (timed on first use)."""
        if key in self.choices:
            return self.choices[key]
        if len(alternatives) == 1:
            return next(iter(alternatives))
        if not can_time:
            return self.default if self.default in alternatives else next(iter(alternatives))
        times = {name: self.timer(fn) for name, fn in alternatives.items()}
        self.timings[key] = times
        self.choices[key] = min(times, key=times.__getitem__)
        return self.choices[key]


def cuda_timer(repeats: int = 5) -> Callable[[Callable[[], object]], float]:
    """A timer for MeasuredPlan: the median of ``repeats`` calls between CUDA events, after one warm-up."""
    import statistics

    import torch

    def time(fn: Callable[[], object]) -> float:
        fn()
        samples = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        return statistics.median(samples)

    return time
