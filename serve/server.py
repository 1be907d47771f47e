"""`dsf serve`: load a DSF checkpoint or dense model behind the OpenAI-compatible app, run uvicorn."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from dsf_runtime.errors import ConfigError
from dsf_runtime.serve.engine import Engine
from dsf_runtime.serve.metrics import ServerMetrics

log = logging.getLogger("dsf_runtime.serve")


def default_model_name(model: str) -> str:
    """The name clients send as `model`: the directory name of a path, else the embedded name."""
    path = Path(model)
    return path.resolve().name if path.exists() else model


def make_loader(model: str, device: str = "cpu", backend: str = "auto", max_concurrency: int = 8,
                max_queue: int = 64, max_model_len: int | None = None):
    """A function that loads the model and builds its engine (run by the app in a thread)."""

    def load(metrics: ServerMetrics) -> Engine:
        from dsf_runtime.checkpoint import backend_summary, load_any

        net, tokenizer = load_any(model, device=device, backend=backend)
        engine = Engine(net, tokenizer, max_concurrency=max_concurrency, max_queue=max_queue,
                        max_model_len=max_model_len, metrics=metrics)
        log.warning("serving %s on %s: backend %s; %d slots x %d tokens of KV cache (%.0f MiB)", model, device,
                    backend_summary(net), max_concurrency, engine.max_model_len, engine.runner.cache_bytes() / 2**20)
        return engine

    return load


def check_model_exists(model: str) -> None:
    """Fail before binding a port when MODEL names nothing we could load."""
    from dsf_runtime.checkpoint import is_dsf_checkpoint
    from dsf_runtime.models import EMBEDDED

    if model in EMBEDDED or is_dsf_checkpoint(model):
        return
    path = Path(model)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ConfigError(f"{model} is neither a DSF checkpoint, a model directory nor an embedded model "
                          f"({', '.join(sorted(EMBEDDED))})")


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, *, served_model_name: str | None = None,
          api_key: str | None = None, log_level: str = "info", **engine_options) -> None:
    import uvicorn

    from dsf_runtime.serve.app import create_app

    check_model_exists(model)
    api_key = api_key or os.environ.get("DSF_API_KEY") or None
    app = create_app(make_loader(model, **engine_options), served_model_name or default_model_name(model), api_key)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
