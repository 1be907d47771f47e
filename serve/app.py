"""The OpenAI-compatible HTTP server (FastAPI) in front of the generation engine.

Routes: POST /v1/completions, POST /v1/chat/completions (both streaming as
server-sent events), GET /v1/models, GET /health, GET /metrics (Prometheus),
POST /tokenize, POST /detokenize. Errors are OpenAI-shaped:
{"error": {"message", "type", "param", "code"}}.

Tokenizing and detokenizing run in a thread pool, never on the event loop, so a
huge prompt being tokenized does not hold up /health or other clients' streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsf_runtime.errors import DSFError

from dsf_runtime.serve.engine import (
    Completion,
    ContextLengthError,
    Engine,
    EngineDeadError,
    InvalidPromptError,
    OutputStream,
    QueueFullError,
    StepOutput,
    collect,
)
from dsf_runtime.serve.errors import APIError, ErrorResponse
from dsf_runtime.serve.guard import PUBLIC_PATHS, RequestGuard
from dsf_runtime.serve.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from dsf_runtime.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    _Common,
)
from dsf_runtime.serve.sampling import SamplingParams, TokenChoice

log = logging.getLogger("dsf_runtime.serve")

Loader = Callable[[ServerMetrics], Engine]
DEFAULT_MAX_REQUEST_BYTES = 2 * 2**20


def _error_response(err: APIError) -> JSONResponse:
    return err.response()


class ServerState:
    """What the routes share: the engine once loaded, or why it is not there."""

    def __init__(self, model_name: str, api_key: str | None) -> None:
        self.model_name = model_name
        self.api_key = api_key
        self.metrics = ServerMetrics(model_name)
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.load_exception: BaseException | None = None
        self.loaded = threading.Event()
        self.created = int(time.time())

    def load(self, loader: Loader, start_engine: bool = True) -> None:
        try:
            engine = loader(self.metrics)
            self.engine = engine.start() if start_engine else engine
            log.info("model %s ready (context %d tokens)", self.model_name, engine.max_model_len)
        except Exception as exc:  # reported by /health and every route
            if isinstance(exc, DSFError):  # a bad checkpoint or setting: its message says it all
                log.debug("loading %s failed: %s", self.model_name, exc)
            else:
                log.exception("loading %s failed", self.model_name)
            self.load_error = f"{type(exc).__name__}: {exc}"
            self.load_exception = exc
        finally:
            self.loaded.set()

    def ready_engine(self) -> Engine:
        if self.engine is None:
            if self.load_error is not None:
                raise APIError(503, f"the model failed to load: {self.load_error}", "server_error", code="load_failed")
            raise APIError(503, "the model is still loading; retry shortly", "server_error", code="loading")
        if not self.engine.alive:
            raise APIError(503, f"the engine stopped: {self.engine.error}", "server_error", code="engine_dead")
        return self.engine


def create_app(
    loader: Loader,
    model_name: str,
    api_key: str | None = None,
    start_engine: bool = True,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> FastAPI:
    """An app that loads its engine with ``loader`` in a thread (so /health answers 503 meanwhile).
    ``start_engine=False`` leaves running the engine to the caller (`dsf serve` runs it on the main thread).
    ``api_key`` (checked before any body is read) guards every route but /health, /metrics and the docs;
    bodies over ``max_request_bytes`` get 413."""
    state = ServerState(model_name, api_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=state.load, args=(loader, start_engine), name="dsf-load", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="dsf-runtime", version="1", lifespan=lifespan)
    app.state.server = state
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=max_request_bytes)
    app.openapi = lambda: _openapi(app)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        return _error_response(_from_validation(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(exc.status_code, str(exc.detail), kind))

    def check_model(name: str | None) -> None:
        if name is not None and name != state.model_name:
            raise APIError(
                404,
                f"the model '{name}' does not exist; this server serves '{state.model_name}'",
                "invalid_request_error",
                "model",
                "model_not_found",
            )

    @app.get("/health")
    async def health():
        if state.engine is not None and state.engine.alive:
            return {"status": "ok"}
        if state.engine is not None and state.engine.error is not None:
            return JSONResponse({"status": "error", "message": f"engine stopped: {state.engine.error}"}, 503)
        if state.load_error is not None:
            return JSONResponse({"status": "error", "message": state.load_error}, 503)
        return JSONResponse({"status": "loading"}, 503)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {
                "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                "description": "Prometheus text format",
            }
        },
    )
    async def metrics():
        if state.engine is not None:
            running, waiting = state.engine.load()
            state.metrics.set_load(running, waiting)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model_entry() -> dict:
        entry = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "dsf-runtime"}
        if state.engine is not None:
            entry["max_model_len"] = state.engine.max_model_len
        return entry

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_entry()]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str):
        check_model(model_id)
        return model_entry()

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        engine = state.ready_engine()
        check_model(body.model)
        if body.messages is not None:
            ids = await run_in_threadpool(_chat_ids, engine.tokenizer, [m.template_dict() for m in body.messages])
        else:
            ids = await run_in_threadpool(_encode, engine.tokenizer, body.prompt, body.add_special_tokens)
        payload = {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}
        # a long text's token list takes long to serialize: off the event loop as well
        return Response(await run_in_threadpool(json.dumps, payload), media_type="application/json")

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        engine = state.ready_engine()
        check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < engine.vocab_size]
        if bad:
            raise APIError(
                400, f"token id {bad[0]} is outside the vocabulary (0..{engine.vocab_size - 1})", param="tokens"
            )
        return {"prompt": await run_in_threadpool(engine.tokenizer.decode, body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        engine = state.ready_engine()
        check_model(body.model)
        _warn_ignored(body, "/v1/completions")
        prompts = await run_in_threadpool(_prompt_ids, engine, body.prompt)
        max_tokens = body.max_tokens or 16
        jobs = [(ids, body.sampling(max_tokens, i)) for ids in prompts for i in range(body.n)]
        streams = _open_all(engine, jobs)
        meta = _Meta(f"cmpl-{uuid.uuid4().hex}", int(time.time()), state.model_name)
        prompt_tokens = sum(len(ids) for ids in prompts)
        if body.stream:
            return _sse(_completion_chunks(engine, streams, meta, body.include_usage, prompt_tokens))
        results = await _collect_all(streams, request)
        choices = []
        echoed = await run_in_threadpool(_echoes, engine.tokenizer, prompts) if body.echo else None
        for k, result in enumerate(results):
            text = result.text
            if echoed is not None:
                text = echoed[k // body.n] + text
            choices.append(
                {
                    "index": k,
                    "text": text,
                    "finish_reason": result.finish_reason,
                    "logprobs": _completion_logprobs(engine.tokenizer, result.logprobs)
                    if body.logprobs is not None
                    else None,
                }
            )
        return meta.body("text_completion", choices, _usage(prompt_tokens, results))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        engine = state.ready_engine()
        check_model(body.model)
        _warn_ignored(body, "/v1/chat/completions")
        messages = body.template_messages()
        engine.check_text_fits([m["content"] for m in messages])
        ids = await run_in_threadpool(_chat_ids, engine.tokenizer, messages)
        max_tokens = body.requested_max_tokens
        if max_tokens is None:  # OpenAI: up to the context
            max_tokens = engine.max_model_len - len(ids)
            if max_tokens < 1:
                engine.check_fits(len(ids), 1)
        jobs = [(ids, body.sampling(max_tokens, i)) for i in range(body.n)]
        streams = _open_all(engine, jobs)
        meta = _Meta(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.model_name)
        if body.stream:
            return _sse(_chat_chunks(engine, streams, meta, body.include_usage, len(ids), body.logprobs))
        results = await _collect_all(streams, request)
        choices = [
            {
                "index": k,
                "message": {"role": "assistant", "content": r.text},
                "finish_reason": r.finish_reason,
                "logprobs": {"content": _chat_logprobs(engine.tokenizer, r.logprobs)} if body.logprobs else None,
            }
            for k, r in enumerate(results)
        ]
        return meta.body("chat.completion", choices, _usage(len(ids), results))

    for error, status, kind in (
        (ContextLengthError, 400, "invalid_request_error"),
        (InvalidPromptError, 400, "invalid_request_error"),
        (QueueFullError, 503, "server_error"),
        (EngineDeadError, 503, "server_error"),
    ):
        app.add_exception_handler(error, _handler(status, kind))
    app.add_exception_handler(ValidationError, lambda _, exc: _error_response(_from_validation(exc.errors())))
    return app


def _handler(status: int, kind: str):
    async def handle(_: Request, exc: Exception):
        code = {ContextLengthError: "context_length_exceeded", QueueFullError: "server_busy"}.get(type(exc))
        return _error_response(APIError(status, str(exc), kind, None, code))

    return handle


def _from_validation(errors) -> APIError:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    param = (first.get("ctx") or {}).get("param") or ".".join(loc) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":  # its loc is a character offset, not a parameter
        where = (first.get("ctx") or {}).get("error")
        message = "the request body is not valid JSON" + (f" ({where})" if where else "")
        param = None
    elif first.get("type") == "invalid_unicode":
        pass  # the message names the field already
    elif first.get("type") == "missing":
        message = f"'{param}' is a required field"
    elif param:
        message = f"{param}: {message}"
    return APIError(400, message, "invalid_request_error", param)


def _warn_ignored(body: _Common, route: str) -> None:
    if body.model_extra:
        log.warning("%s: ignoring unsupported fields %s", route, ", ".join(sorted(body.model_extra)))


def _encode(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _prompt_ids(engine: Engine, prompt) -> list[list[int]]:
    """Every OpenAI prompt form -> a list of token-id lists (run in the thread pool)."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    else:
        prompts = prompt
    for p in prompts:
        if isinstance(p, str):
            engine.check_text_fits([p])
    return [_encode(engine.tokenizer, p) if isinstance(p, str) else list(p) for p in prompts]


def _echoes(tokenizer, prompts: list[list[int]]) -> list[str]:
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in prompts]


def _chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    try:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])
    except Exception as exc:  # a template that rejects this conversation (e.g. role order)
        raise APIError(400, f"the chat template rejected these messages: {exc}", param="messages") from exc


def _open_all(engine: Engine, jobs: list[tuple[list[int], SamplingParams]]) -> list[OutputStream]:
    """Submit every sub-request (prompt x n) or none: a failure cancels the ones already queued."""
    capacity = engine.max_queue + engine.max_concurrency
    if len(jobs) > capacity:  # could never be admitted whole, however idle the server: not a 503
        raise APIError(
            400,
            f"this request asks for {len(jobs)} generations (prompts x n); this server holds at "
            f"most {capacity} at once (--max-concurrency + --max-queue)",
            param="n",
        )
    for ids, params in jobs:
        engine.check_fits(len(ids), params.max_tokens)
    streams: list[OutputStream] = []
    try:
        for ids, params in jobs:
            streams.append(engine.open(ids, params))
    except BaseException:
        for s in streams:
            s.close()
        raise
    return streams


async def _collect(stream: OutputStream) -> Completion:
    return collect([out async for out in stream])


async def _collect_all(streams: list[OutputStream], request: Request) -> list[Completion]:
    """Wait for every sub-request; a client that hangs up cancels them (slots and cache freed)."""
    gathered = asyncio.gather(*(_collect(s) for s in streams))
    try:
        while True:
            done, _ = await asyncio.wait({gathered}, timeout=0.25)
            if done:
                results = gathered.result()
                break
            if await request.is_disconnected():
                log.info("client disconnected; cancelling %d request(s)", len(streams))
                gathered.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await gathered  # retrieve the cancellation (else asyncio logs it as never retrieved)
                raise APIError(499, "client disconnected", "invalid_request_error")
    finally:
        for s in streams:
            s.close()
    failed = [r for r in results if r.finish_reason in ("error", "abort")]
    if failed:
        raise APIError(
            503 if failed[0].finish_reason == "abort" else 500, failed[0].error or "generation aborted", "server_error"
        )
    return results


class _Meta:
    def __init__(self, id_: str, created: int, model: str) -> None:
        self.id, self.created, self.model = id_, created, model

    def body(self, obj: str, choices: list[dict], usage: dict | None = None, with_usage: bool = True) -> dict:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if with_usage:
            out["usage"] = usage
        return out


def _usage(prompt_tokens: int, results) -> dict:
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def _completion_logprobs(tokenizer, choices: list[TokenChoice], offset: int = 0) -> dict:
    tokens = [_token_text(tokenizer, c.token) for c in choices]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [c.logprob for c in choices],
        "top_logprobs": [{_token_text(tokenizer, i): lp for i, lp in c.top} for c in choices],
        "text_offset": offsets,
    }


def _chat_logprobs(tokenizer, choices: list[TokenChoice]) -> list[dict]:
    def entry(token: int, logprob: float) -> dict:
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [{**entry(c.token, c.logprob), "top_logprobs": [entry(i, lp) for i, lp in c.top]} for c in choices]


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _data(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _merged(streams: list[OutputStream]) -> AsyncIterator[tuple[int, StepOutput]]:
    """Outputs of several sub-requests as they come, tagged with the sub-request's index;
    ends when all finished. Leaving early (client gone) cancels them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: OutputStream) -> None:
        async for out in stream:
            await queue.put((index, out))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, out = await queue.get()
            if out.finished:
                remaining -= 1
            yield index, out
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.close()


def _stream_error(out: StepOutput) -> str:
    return _data(APIError(500, out.error or f"generation ended: {out.finish_reason}", "server_error").body())


async def _chunks(
    streams, meta: _Meta, obj: str, include_usage: bool, prompt_tokens: int, choice_of, preamble: list[dict] = ()
) -> AsyncIterator[str]:
    """SSE events for merged sub-request streams: ``preamble`` choices first, then one chunk per
    output (``choice_of(index, out)`` shapes its choice), the usage chunk if asked, then [DONE].
    Errors end the stream with an error object, never a silent hang-up."""
    completion_tokens = 0
    try:
        for choice in preamble:
            yield _data(meta.body(obj, [choice], None, with_usage=include_usage))
        async for index, out in _merged(streams):
            if out.finish_reason in ("error", "abort"):
                yield _stream_error(out)
                break
            if not out.text and not out.finished and not out.logprobs:
                continue
            if out.finished:
                completion_tokens += out.completion_tokens
            yield _data(meta.body(obj, [choice_of(index, out)], None, with_usage=include_usage))
        else:
            if include_usage:
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                }
                yield _data(meta.body(obj, [], usage))
    except Exception as exc:  # never leave a client hanging without [DONE]
        log.exception("stream failed")
        yield _data(APIError(500, f"internal error: {exc}", "server_error").body())
    yield "data: [DONE]\n\n"


def _completion_chunks(
    engine: Engine, streams, meta: _Meta, include_usage: bool, prompt_tokens: int
) -> AsyncIterator[str]:
    def choice(index: int, out: StepOutput) -> dict:
        logprobs = _completion_logprobs(engine.tokenizer, out.logprobs) if out.logprobs else None
        return {"index": index, "text": out.text, "logprobs": logprobs, "finish_reason": out.finish_reason}

    return _chunks(streams, meta, "text_completion", include_usage, prompt_tokens, choice)


def _chat_chunks(
    engine: Engine, streams, meta: _Meta, include_usage: bool, prompt_tokens: int, logprobs: bool
) -> AsyncIterator[str]:
    def choice(index: int, out: StepOutput) -> dict:
        delta = {"content": out.text} if out.text or not out.finished else {}
        lp = {"content": _chat_logprobs(engine.tokenizer, out.logprobs)} if logprobs and out.logprobs else None
        return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": out.finish_reason}

    first = [
        {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        for i in range(len(streams))
    ]
    return _chunks(streams, meta, "chat.completion.chunk", include_usage, prompt_tokens, choice, first)


_ERROR_DESCRIPTIONS = {
    400: "Invalid parameters, prompt or JSON",
    401: "Missing or wrong API key (when the server has one)",
    404: "Another model name than the one served",
    413: "The request body is larger than --max-request-bytes",
    500: "Generation failed for this request (the server goes on)",
    503: "The model is loading, failed to load, the engine stopped, or the queue is full",
}


def _operation_errors(path: str, method: str) -> list[int]:
    """The error statuses a route can answer with (what the served schema documents)."""
    if path == "/health":
        return []
    statuses = [] if path in PUBLIC_PATHS else [401]
    if method == "post":
        statuses += [400, 404, 413, 503]
        if path in ("/v1/completions", "/v1/chat/completions"):
            statuses.append(500)
    elif path.startswith("/v1/models/"):
        statuses.append(404)
    return sorted(statuses)


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema with the statuses this server really answers: 400 (not 422) for invalid
    bodies, the OpenAI error object for every error, server-sent events for streaming routes."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (ErrorResponse,):
        defs = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(defs.pop("$defs", {}))
        components[model.__name__] = defs
    error_content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for status in _operation_errors(path, method):
                responses[str(status)] = {"description": _ERROR_DESCRIPTIONS[status], "content": error_content}
            if path in ("/v1/completions", "/v1/chat/completions"):
                event = {
                    "type": "object",
                    "required": ["data"],
                    "properties": {
                        "data": {"type": "string", "description": "a JSON chunk (or an error object), then [DONE]"}
                    },
                }
                responses["200"]["content"]["text/event-stream"] = {"schema": event}
            if path == "/health":
                health = {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {"status": {"type": "string"}, "message": {"type": "string"}},
                            "required": ["status"],
                        }
                    }
                }
                responses["200"] = {"description": "Ready", "content": health}
                responses["503"] = {"description": "Loading, failed to load, or the engine stopped", "content": health}
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    app.openapi_schema = schema
    return schema
