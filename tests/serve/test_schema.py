"""Schemathesis against the schema the server serves, with the model name fixed so requests
reach generation: no response is a server error, and every status, content type and error body
is one the schema documents."""

from __future__ import annotations

import copy

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from dsf_runtime.serve.app import create_app
from dsf_runtime.serve.server import BackgroundServer, make_loader
from tests_support import chat_tokenizer, save_tiny

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

NAME = "tiny-dsf"
EXAMPLES = {"post": 260, "get": 20}  # 4 POST routes x 260 + the GETs: > 1000 requests


@pytest.fixture(scope="module")
def server(tiny_tokenizer, tmp_path_factory):
    from dsf_runtime.cli import main

    root = tmp_path_factory.mktemp("schema")
    dense = save_tiny(root / "dense", chat_tokenizer(tiny_tokenizer), max_position_embeddings=256)
    out = root / NAME
    assert main(["compress", str(dense), str(out), "--sparsity", "0.5", "--nsamples", "4", "--seqlen", "32"]) == 0
    app = create_app(make_loader(str(out), max_concurrency=4, max_queue=64, max_model_len=64), NAME)
    with BackgroundServer(app) as srv:
        yield srv


def _fixed_model(schema: dict) -> dict:
    """The served schema with every `model` property limited to the served name."""
    schema = copy.deepcopy(schema)
    for component in schema["components"]["schemas"].values():
        props = component.get("properties", {})
        if "model" in props:
            props["model"] = {"type": "string", "enum": [NAME]}
    return schema


def test_schemathesis_finds_no_server_error(server):
    raw = httpx.get(server.url + "/openapi.json").json()
    schema = schemathesis.openapi.from_dict(_fixed_model(raw))
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    sent = []
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for result in schema.get_all_operations():
            operation = result.ok()
            examples = EXAMPLES[operation.method.lower()]

            @settings(
                max_examples=examples,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(GenerationMode.NEGATIVE))
            def run(case):
                kwargs = case.as_transport_kwargs(base_url=server.url)
                if "data" in kwargs:  # raw bodies (negative cases): httpx calls them content
                    kwargs["content"] = kwargs.pop("data")
                response = http.request(
                    url=case.formatted_path,
                    **{k: v for k, v in kwargs.items() if k in ("method", "headers", "params", "json", "content")},
                )
                sent.append(response.status_code)
                case.validate_response(response, checks=checks)

            run()
    assert len(sent) >= 1000 and not [s for s in sent if s >= 500]
    assert sent.count(200) > 100  # generation was reached, not only refusals
    assert httpx.get(server.url + "/health").status_code == 200
