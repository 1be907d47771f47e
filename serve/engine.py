"""The generation engine: a scheduler thread that batches concurrent requests.

Continuous batching: between two decode steps, waiting requests are prefilled
into free KV-cache slots and join the batch; finished or cancelled ones leave
and free their slot at once. Every request streams its tokens through a sink
(a callable run on the engine thread), which the HTTP layer bridges to asyncio.

Isolation: whatever goes wrong with one request (its prefill, its sampling, its
detokenization) ends that request with finish_reason "error" and frees its slot;
the others go on. A failure of the batched decode step ends the requests in it,
clears the KV cache and restarts the loop (waiting requests keep their place);
only more than ``max_restarts`` such failures within ``restart_window`` seconds
stop the engine for good.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dsf_runtime.errors import DSFError
from dsf_runtime.serve.metrics import ServerMetrics
from dsf_runtime.runner import ModelRunner, eos_token_ids
from dsf_runtime.serve.sampling import SamplingParams, TokenChoice, check_logits, choose_token
from dsf_runtime.serve.text import TextStream, max_token_bytes

log = logging.getLogger(__name__)


class EngineError(DSFError):
    """Base of the errors a request can get from the engine."""


class QueueFullError(EngineError):
    """Too many requests are waiting: try again later (HTTP 503)."""


class InvalidPromptError(EngineError):
    """The prompt cannot be run: empty, or a token id outside the vocabulary (HTTP 400)."""


class ContextLengthError(InvalidPromptError):
    """Prompt plus max_tokens do not fit the context (HTTP 400)."""


class EngineDeadError(EngineError):
    """The engine stopped after a fatal error or a shutdown (HTTP 503)."""


@dataclass
class StepOutput:
    """What one engine step produced for one request."""

    request_id: str
    text: str  # new text since the previous output
    token_ids: list[int]
    logprobs: list[TokenChoice]
    finished: bool
    finish_reason: str | None  # stop | length | abort | error
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclass
class Completion:
    """A whole generation, for callers that do not stream."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenChoice]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[StepOutput], None]
    stream: TextStream
    arrival: float = field(default_factory=time.perf_counter)
    generator: torch.Generator | None = None
    generated: list[int] = field(default_factory=list)
    pos: int = 0  # tokens in the KV cache
    last_emit: float = 0.0
    cancelled: bool = False
    done: bool = False

    def cancel(self) -> None:
        """Ask the engine to drop this request; its slot and cache are freed on the next step."""
        self.cancelled = True


class Engine:
    """Owns the model runner and one scheduler thread; thread-safe ``submit`` / ``cancel``."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        max_concurrency: int = 8,
        max_queue: int = 64,
        max_model_len: int | None = None,
        metrics: ServerMetrics | None = None,
        max_prefill_tokens: int = 2048,
        max_restarts: int = 5,
        restart_window: float = 60.0,
    ) -> None:
        if max_concurrency < 1 or max_queue < 0 or max_restarts < 0:
            raise ValueError("max_concurrency must be >= 1, max_queue >= 0 and max_restarts >= 0")
        self.runner = ModelRunner(model, slots=max_concurrency, max_len=max_model_len)
        self.tokenizer = tokenizer
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.vocab_size = int(model.config.vocab_size)
        per_token = max_token_bytes(tokenizer)
        # text longer than this cannot fit the context: refused before it is tokenized (x2: normalizer slack)
        self.max_prompt_bytes = None if per_token is None else 2 * per_token * self.runner.max_len
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.metrics = metrics
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.restarts: deque[float] = deque()  # times of the restarts within the window
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # index == KV-cache slot
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._loop_running = False
        self.error: BaseException | None = None

    # ---- public API -------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.runner.max_len

    @property
    def alive(self) -> bool:
        """True while the scheduler loop runs (in ``start``'s thread or in ``run_forever``'s caller)."""
        return self._loop_running and self.error is None

    def load(self) -> tuple[int, int]:
        """(running, waiting) request counts."""
        with self._cond:
            return len(self._running), len(self._waiting)

    def start(self) -> "Engine":
        """Run the scheduler in a background thread (tests, notebooks). On CPU, prefer
        ``run_forever`` on the main thread: torch's CPU GEMMs run several times slower
        from other threads here (measured in benchmarks/serving.py), which is why
        `dsf serve` runs the HTTP server in a thread and the engine on the main one."""
        if self._thread is None:
            self._loop_running = True
            self._thread = threading.Thread(target=self.run_forever, name="dsf-engine", daemon=True)
            self._thread.start()
        return self

    def run_until_idle(self) -> None:
        """Step on the calling thread until no request is waiting or running (benchmarks, scripts)."""
        while True:
            with self._cond:
                if not self._waiting and not self._running:
                    return
            self.step()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop (pending requests end with finish_reason "abort"); safe from a signal handler."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        limit = self.runner.max_len
        if prompt_tokens < 1:
            raise InvalidPromptError("the prompt is empty: at least one token is needed")
        if prompt_tokens + max_tokens > limit:
            raise ContextLengthError(
                f"this model's maximum context length is {limit} tokens, but {prompt_tokens + max_tokens} were "
                f"requested ({prompt_tokens} in the prompt, {max_tokens} for the completion); "
                "reduce the prompt or max_tokens"
            )

    def check_text_fits(self, texts: list[str]) -> None:
        """Refuse prompt text that cannot fit the context whatever it tokenizes to, without
        tokenizing it (an 8 MB prompt would take seconds of CPU and hundreds of MiB to count)."""
        if self.max_prompt_bytes is None:
            return
        size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        if size > self.max_prompt_bytes:
            raise ContextLengthError(
                f"this model's maximum context length is {self.runner.max_len} tokens, and a prompt of {size} bytes "
                f"cannot fit it (prompts longer than {self.max_prompt_bytes} bytes are refused before tokenizing); "
                "reduce the prompt"
            )

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[StepOutput], None]) -> Request:
        """Queue a request; raises ContextLengthError, QueueFullError or EngineDeadError."""
        self.check_fits(len(prompt_ids), params.max_tokens)
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidPromptError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.runner.device).manual_seed(params.generator_seed())
        request = Request(
            request_id=f"req-{next(self._ids)}",
            prompt_ids=list(prompt_ids),
            params=params,
            sink=sink,
            stream=TextStream(self.tokenizer, params.stop),
            generator=generator,
        )
        with self._cond:
            if self.error is not None or self._stop:
                raise EngineDeadError(f"the engine is not running: {self.error or 'shut down'}")
            free = self.max_concurrency - len(self._running)
            if len(self._waiting) >= self.max_queue + max(free, 0):
                raise QueueFullError(f"the server is busy: {len(self._waiting)} requests are waiting; retry later")
            self._waiting.append(request)
            self._update_gauges()
            self._cond.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        request.cancel()
        with self._cond:
            self._cond.notify_all()

    def generate(self, prompt_ids: list[int], params: SamplingParams, timeout: float | None = None) -> Completion:
        """Blocking: submit and collect the whole completion (for scripts, tests and benchmarks)."""
        outputs: queue.Queue[StepOutput] = queue.Queue()
        self.submit(prompt_ids, params, outputs.put)
        return collect(iter(lambda: outputs.get(timeout=timeout), None))

    def open(self, prompt_ids: list[int], params: SamplingParams) -> "OutputStream":
        """Submit now (errors raise here) and return an async iterator over the request's outputs.
        Call from a running event loop; closing the stream early cancels the request."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[StepOutput] = asyncio.Queue()
        request = self.submit(prompt_ids, params, lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out))
        return OutputStream(self, request, outputs)

    # ---- scheduler --------------------------------------------------------------------------
    def _update_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.set_load(len(self._running), len(self._waiting))

    def run_forever(self) -> None:
        """The scheduler loop on the calling thread; returns after ``shutdown`` or when restarts
        are exhausted. A failed step is survived by ``_restart`` while the restart budget lasts."""
        self._loop_running = True
        try:
            while True:
                with self._cond:
                    while not self._stop and not self._waiting and not self._running:
                        self._cond.wait()
                    if self._stop:
                        break
                try:
                    self.step()
                except Exception as exc:
                    if not self._restart(exc):
                        self.error = exc
                        break
        except BaseException as exc:  # KeyboardInterrupt, SystemExit: fail everyone, report unhealthy
            log.exception("engine stopped")
            self.error = exc
        finally:
            with self._cond:
                pending = list(self._running) + list(self._waiting)
                self._running.clear()
                self._waiting.clear()
                self._update_gauges()
            reason = "error" if self.error is not None else "abort"
            message = f"engine error: {self.error}" if self.error is not None else "the server is shutting down"
            for request in pending:
                self._finish(request, reason, error=message)
            self._loop_running = False

    def _restart(self, exc: Exception) -> bool:
        """After a failed step: end the running requests with an error, clear the KV cache, and
        go on with the waiting ones. False when more than ``max_restarts`` happened within
        ``restart_window`` seconds (the engine then stops and reports unhealthy)."""
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > self.restart_window:
            self.restarts.popleft()
        if len(self.restarts) >= self.max_restarts:
            log.error(
                "engine step failed (%s: %s); %d restarts within %.0f s already: stopping",
                type(exc).__name__,
                exc,
                len(self.restarts),
                self.restart_window,
                exc_info=exc,
            )
            return False
        self.restarts.append(now)
        log.error(
            "engine step failed (%s: %s); ending the %d running request(s) and restarting",
            type(exc).__name__,
            exc,
            len(self._running),
            exc_info=exc,
        )
        with self._cond:
            running = list(self._running)
            self._running.clear()
            self._update_gauges()
        for request in running:
            self._finish(request, "error", error=f"engine error: {type(exc).__name__}: {exc} (the engine restarted)")
        self.runner.clear()
        if self.metrics is not None:
            self.metrics.observe_restart()
        return True

    def step(self) -> None:
        """Drop cancelled requests, admit waiting ones (prefill), then one decode step for all."""
        self._drop_cancelled()
        self._admit()
        if self._running:
            self._decode()
        with self._cond:
            self._update_gauges()

    def _drop_cancelled(self) -> None:
        with self._cond:
            gone = [r for r in self._waiting if r.cancelled]
            for r in gone:
                self._waiting.remove(r)
        for r in gone:
            self._finish(r, "abort")
        self._release([i for i, r in enumerate(self._running) if r.cancelled], reason="abort")

    def _admit(self) -> None:
        budget = self.max_prefill_tokens
        while len(self._running) < self.max_concurrency:
            with self._cond:
                if not self._waiting or (budget <= 0 and self._running):
                    return
                request = self._waiting.popleft()
                slot = len(self._running)
                self._running.append(request)
            if request.cancelled:
                self._release([slot], reason="abort")
                continue
            budget -= len(request.prompt_ids)
            now = time.perf_counter()
            if self.metrics is not None:
                self.metrics.observe_queue(now - request.arrival, len(request.prompt_ids))
            try:
                logits = self.runner.prefill(slot, request.prompt_ids)
            except Exception as exc:  # this prompt's forward failed: only this request ends
                self._fail(request, slot, exc)
            else:
                request.pos = len(request.prompt_ids)
                self._sample_and_emit([request], logits.unsqueeze(0))
            self._release([slot] if request.done else [], reason=None)

    def _decode(self) -> None:
        batch = list(self._running)
        logits = self.runner.decode([r.generated[-1] for r in batch], [r.pos for r in batch])
        for r in batch:
            r.pos += 1
        self._sample_and_emit(batch, logits)
        self._release([i for i, r in enumerate(self._running) if r.done], reason=None)

    def _sample_and_emit(self, batch: list[Request], logits: torch.Tensor) -> None:
        """logits (B, vocab) for the requests in ``batch`` (slots 0..B-1, or one prefilled slot):
        choose, detokenize, stream. A request whose sampling or detokenization fails ends alone."""
        argmax = None
        if all(r.params.plain_greedy for r in batch):
            argmax = torch.argmax(logits, dim=-1).tolist()
        now = time.perf_counter()
        for i, (r, row) in enumerate(zip(batch, logits)):
            try:
                if argmax is not None:
                    check_logits(row)  # argmax would pick a NaN
                    choice = TokenChoice(int(argmax[i]))
                else:
                    seen = None
                    if r.params.repetition_penalty != 1.0:
                        seen = torch.tensor(r.prompt_ids + r.generated, dtype=torch.long, device=row.device)
                    choice = choose_token(row, r.params, seen, r.generator)
                self._emit_token(r, choice, now)
            except Exception as exc:
                self._fail(r, self._running.index(r), exc)

    def _fail(self, r: Request, slot: int, exc: Exception) -> None:
        """End one request with an error; its slot's cache is cleared (it may hold NaNs that a
        masked attention read would spread to the next occupant)."""
        log.warning("request %s failed: %s: %s", r.request_id, type(exc).__name__, exc)
        self.runner.clear(slot)
        self._finish(r, "error", error=f"{type(exc).__name__}: {exc}")

    def _emit_token(self, r: Request, choice: TokenChoice, now: float) -> None:
        first = not r.generated
        r.generated.append(choice.token)
        if self.metrics is not None:
            self.metrics.observe_token(first, now - (r.arrival if first else r.last_emit))
        r.last_emit = now
        reason = None
        token = choice.token
        if token in self.eos_ids and not r.params.ignore_eos:
            reason = "stop"
        elif token in r.params.stop_token_ids:
            reason = "stop"
        elif r.stream.add(token):
            reason = "stop"
        if reason is None and len(r.generated) >= r.params.max_tokens:
            reason = "length"
        if reason is None and r.pos >= self.runner.max_len:
            reason = "length"  # no room for another token (guarded at submit, kept for safety)
        self._send(
            r,
            r.stream.delta(final=reason is not None),
            [token],
            [choice] if r.params.logprobs is not None else [],
            reason,
        )

    def _send(
        self,
        r: Request,
        text: str,
        ids: list[int],
        logprobs: list[TokenChoice],
        reason: str | None,
        error: str | None = None,
    ) -> None:
        finished = reason is not None
        if finished:
            r.done = True
            if self.metrics is not None:
                self.metrics.observe_finish(time.perf_counter() - r.arrival, reason)
        out = StepOutput(
            r.request_id, text, ids, logprobs, finished, reason, len(r.prompt_ids), len(r.generated), error
        )
        try:
            r.sink(out)
        except Exception:  # a broken consumer must not stop the engine
            log.exception("dropping output of %s: its consumer failed", r.request_id)
            r.cancelled = True

    def _finish(self, r: Request, reason: str, error: str | None = None) -> None:
        if r.done:
            return
        text = ""
        if reason not in ("abort", "error"):
            text = r.stream.delta(final=True)
        self._send(r, text, [], [], reason, error)

    def _release(self, slots: list[int], reason: str | None) -> None:
        """Remove the requests in ``slots`` (highest first), moving the last active one into each hole."""
        for slot in sorted(set(slots), reverse=True):
            with self._cond:
                request = self._running[slot]
                last = len(self._running) - 1
                if slot != last:
                    mover = self._running[last]
                    self.runner.move(last, slot, mover.pos)
                    self._running[slot] = mover
                self._running.pop()
            if reason is not None:
                self._finish(request, reason)


class OutputStream:
    """The outputs of one submitted request, as an async iterator."""

    def __init__(self, engine: Engine, request: Request, outputs: "asyncio.Queue[StepOutput]") -> None:
        self.engine = engine
        self.request = request
        self._outputs = outputs
        self._ended = False

    def __aiter__(self) -> "OutputStream":
        return self

    async def __anext__(self) -> StepOutput:
        if self._ended:
            raise StopAsyncIteration
        out = await self._outputs.get()
        self._ended = out.finished
        return out

    def close(self) -> None:
        """Cancel the request if it is still running (client gone, sibling failed)."""
        if not self.request.done:
            self.engine.cancel(self.request)


def collect(outputs) -> Completion:
    """Fold a stream of StepOutputs (ending with a finished one) into a Completion."""
    text, ids, logprobs = [], [], []
    last = None
    for out in outputs:
        text.append(out.text)
        ids.extend(out.token_ids)
        logprobs.extend(out.logprobs)
        last = out
        if out.finished:
            break
    if last is None:
        raise EngineError("the request produced no output")
    return Completion(
        "".join(text), ids, logprobs, last.finish_reason, last.prompt_tokens, last.completion_tokens, last.error
    )
