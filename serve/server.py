"""`dsf serve`: load a DSF checkpoint or dense model behind the OpenAI-compatible app, run uvicorn."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import torch

from dsf_runtime import settings
from dsf_runtime.errors import ConfigError
from dsf_runtime.serve.engine import Engine
from dsf_runtime.serve.metrics import ServerMetrics

log = logging.getLogger("dsf_runtime.serve")


def default_model_name(model: str) -> str:
    """The name clients send as `model`: the directory name of a path, else the embedded name."""
    path = Path(model)
    return path.resolve().name if path.exists() else model


def make_loader(
    model: str,
    device: str = "cpu",
    backend: str = "auto",
    dtype: torch.dtype | None = None,
    max_concurrency: int = 8,
    max_queue: int = 64,
    max_model_len: int | None = None,
    max_restarts: int = 5,
):
    """A function that loads the model and builds its engine (run by the app in a thread)."""

    def load(metrics: ServerMetrics) -> Engine:
        from dsf_runtime.checkpoint import backend_summary, load_any

        net, tokenizer = load_any(model, device=device, backend=backend, dtype=dtype)
        engine = Engine(
            net,
            tokenizer,
            max_concurrency=max_concurrency,
            max_queue=max_queue,
            max_model_len=max_model_len,
            metrics=metrics,
            max_restarts=max_restarts,
        )
        log.warning(
            "serving %s on %s in %s: backend %s; %d slots x %d tokens of KV cache (%.0f MiB)",
            model,
            device,
            str(engine.runner.dtype).removeprefix("torch."),
            backend_summary(net),
            max_concurrency,
            engine.max_model_len,
            engine.runner.cache_bytes() / 2**20,
        )
        return engine

    return load


def check_model_exists(model: str) -> None:
    """Fail before binding a port when MODEL names nothing we could load."""
    from dsf_runtime.checkpoint import is_dsf_checkpoint
    from dsf_runtime.errors import UnsupportedModelError
    from dsf_runtime.models import EMBEDDED, resolve_model_dir

    if model in EMBEDDED or is_dsf_checkpoint(model):
        return
    try:
        resolve_model_dir(model)  # a local model directory, or a Hub id fetched (or found offline) now
    except UnsupportedModelError as exc:
        raise ConfigError(f"{model} is not a DSF checkpoint, and not a dense model either: {exc}") from None


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    served_model_name: str | None = None,
    api_key: str | None = None,
    log_level: str = "info",
    max_request_bytes: int | None = None,
    **engine_options,
) -> None:
    """Serve until SIGINT/SIGTERM: HTTP in a thread, the engine on this (main) thread."""
    from dsf_runtime.serve.app import DEFAULT_MAX_REQUEST_BYTES, create_app

    check_model_exists(model)
    api_key = api_key or settings.get("DSF_API_KEY")
    app = create_app(
        make_loader(model, **engine_options),
        served_model_name or default_model_name(model),
        api_key,
        start_engine=False,
        max_request_bytes=max_request_bytes or DEFAULT_MAX_REQUEST_BYTES,
    )
    state = app.state.server
    server = BackgroundServer(app, host, port, log_level=log_level).start()
    print(f"dsf serve: listening on {server.url} (loading {model}; /health is 503 until ready)", flush=True)
    stopping = threading.Event()

    def on_signal(signum, frame) -> None:
        stopping.set()
        if state.engine is not None:
            state.engine.shutdown()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not state.loaded.wait(0.2):
            if stopping.is_set():
                return
        if state.load_exception is not None:
            raise state.load_exception
        engine = state.engine
        print(f"dsf serve: ready, serving '{state.model_name}' at {server.url}/v1", flush=True)
        # The engine runs here, on the main thread: torch's CPU GEMMs are much slower from other threads.
        engine.run_forever()
        if engine.error is not None and not stopping.is_set():
            log.error(
                "the engine stopped after %d restarts (%s); /health answers 503 until the server is restarted",
                len(engine.restarts),
                engine.error,
            )
            stopping.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.stop()


class BackgroundServer:
    """Uvicorn running an app on a free loopback port in a thread (tests, benchmarks, notebooks).

    with BackgroundServer(app) as srv:  # returns once the port is bound
        httpx.get(srv.url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=2)
        )
        self.host = host
        self.port = port
        self._thread = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        import threading
        import time

        self._thread = threading.Thread(target=self.server.run, name="dsf-uvicorn", daemon=True)
        self._thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                raise ConfigError(
                    f"could not start the HTTP server on {self.host}:{self.port} "
                    "(is the port in use or the address wrong?)"
                )
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def wait_ready(self, timeout: float = 120.0) -> "BackgroundServer":
        """Block until /health says ok (the model loads in the background)."""
        import time

        import httpx

        end = time.monotonic() + timeout
        while True:
            try:
                resp = httpx.get(self.url + "/health", timeout=5)
                if resp.status_code == 200:
                    return self
                if resp.json().get("status") == "error":
                    raise RuntimeError(f"the server failed: {resp.json().get('message')}")
            except httpx.TransportError:
                pass
            if time.monotonic() > end:
                raise TimeoutError("the server did not become ready")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> "BackgroundServer":
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()
