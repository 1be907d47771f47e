"""ASGI middleware in front of every route: the API key (401), a request-body limit (413),
and a last-resort 500 for anything a route let escape.

It runs before FastAPI parses a body, so a request without a valid key is refused
before its body is read, and an oversized body is refused before it is parsed or
tokenized. Catching errors here, inside Starlette's own error middleware, answers
them without the connection being dropped (keep-alive clients go on working).
"""

from __future__ import annotations

import logging
import secrets

from dsf_runtime.serve.errors import APIError

log = logging.getLogger("dsf_runtime.serve")

PUBLIC_PATHS = frozenset({"/health", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
DRAIN_FACTOR = 16  # an oversized body is read (and dropped) up to this multiple of the limit, then cut off


class RequestGuard:
    def __init__(self, app, *, api_key: str | None, max_body_bytes: int) -> None:
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be >= 1")
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.api_key is not None and scope["path"] not in PUBLIC_PATHS and not self._authorized(scope):
            await self._refuse(
                scope,
                receive,
                send,
                APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')", code="invalid_api_key"),
            )
            return
        body, error = await self._read_body(receive)
        if error is not None:
            await self._refuse(scope, receive, send, error)
            return
        if body is None:  # the client left before sending its body
            return
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # http.disconnect, when the client goes

        started = False

        async def watch(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, replay, watch)
        except Exception as exc:
            log.exception("internal error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()(
                    scope, replay, send
                )

    def _authorized(self, scope) -> bool:
        expected = f"Bearer {self.api_key}".encode()
        given = [v for k, v in scope.get("headers", ()) if k == b"authorization"]
        return len(given) == 1 and secrets.compare_digest(given[0], expected)

    async def _read_body(self, receive) -> tuple[bytes | None, APIError | None]:
        """The whole body, or the error that refuses it; (None, None) if the client disconnected."""
        chunks, size = [], 0
        limit = self.max_body_bytes
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > limit * DRAIN_FACTOR:
                break  # stop reading; the connection closes after the answer
            if not message.get("more_body", False):
                break
        if size > limit:
            return None, APIError(
                413, f"the request body has more than {limit} bytes (--max-request-bytes)", code="request_too_large"
            )
        return b"".join(chunks), None

    @staticmethod
    async def _refuse(scope, receive, send, error: APIError) -> None:
        await error.response()(scope, receive, send)
