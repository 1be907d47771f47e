"""Hostile but fair clients: no request gets a 5xx or stops the engine, errors are clear 4xx,
limits hold, and the served schema says what the server really answers."""

from __future__ import annotations

import json
import math

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsf_runtime.serve.app import create_app
from dsf_runtime.serve.engine import Engine
from tests_support import api_error

NAME = "tiny-dsf"


def _app(parts, **kw):
    model, tok = parts
    return create_app(
        lambda metrics: Engine(model, tok, max_model_len=64, metrics=metrics, max_concurrency=4), NAME, **kw
    )


@pytest.fixture(scope="module")
def client(parts):
    with TestClient(_app(parts, max_request_bytes=64 * 1024)) as c:
        c.app.state.server.loaded.wait(30)
        assert c.get("/health").status_code == 200
        yield c


def _post(client, path: str, body: dict, **kw):
    """Send JSON as Python writes it: NaN and Infinity go out as the bare tokens many clients emit."""
    return client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"}, **kw)


EXTREME_FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
    st.sampled_from([0.0, -0.0, 5e-324, 1e-320, 1e-45, 1e-39, 1e-5, 0.99999, 1.0, 2.0, 2.0000001, 10.0, 1e308]),
)
HUGE_INTS = st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([0, -1, 2**63 - 1, 2**63, 2**64 - 1, 2**64]))


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_sampling_parameters_from_the_whole_float_range(client, data):
    """>= 2000 requests with sampling parameters drawn from every float (subnormals, 0, inf, NaN)
    and huge integers: each answer is 2xx or 4xx, and the engine stays alive."""
    body = {
        "model": NAME,
        "prompt": data.draw(st.sampled_from(["Anne", "Emma was", [5, 6, 7]])),
        "max_tokens": data.draw(st.one_of(st.integers(1, 3), HUGE_INTS)),
        "ignore_eos": True,
    }
    for key in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        if data.draw(st.booleans()):
            body[key] = data.draw(EXTREME_FLOATS)
    for key in ("seed", "top_k", "n", "logprobs"):
        if data.draw(st.booleans()):
            body[key] = data.draw(HUGE_INTS if key in ("seed", "top_k") else st.integers(-2, 6))
    body["stream"] = data.draw(st.booleans())
    resp = _post(client, "/v1/completions", body)
    assert resp.status_code < 500, (body, resp.text)
    if resp.status_code == 200 and not body["stream"]:
        for choice in resp.json()["choices"]:
            assert choice["finish_reason"] in ("length", "stop")
            for lp in (choice["logprobs"] or {}).get("token_logprobs", []):
                assert math.isfinite(lp)
    if resp.status_code == 200 and body["stream"]:
        assert resp.text.endswith("data: [DONE]\n\n") and '"error"' not in resp.text, (body, resp.text)
    assert client.app.state.server.engine.alive


@pytest.mark.parametrize(
    "body",
    [
        {"temperature": 1e-39},
        {"temperature": 1e-320},
        {"top_p": 5e-324},
        {"temperature": 1, "repetition_penalty": 1e-40},
        {"temperature": 2, "top_p": 1e-300, "top_k": 1},
        {"temperature": 1e-5, "repetition_penalty": 10, "logprobs": 5},
    ],
)
def test_the_requests_that_once_killed_the_engine_now_generate(client, body):
    resp = _post(
        client, "/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 4, "ignore_eos": True, **body}
    )
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 4, resp.text
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_400(client, value):
    raw = '{"model": "%s", "prompt": "Hi", "temperature": %s}' % (NAME, value)
    err = api_error(client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"}), 400)
    assert err["param"] == "temperature"


def test_seeds(client):
    body = {"model": NAME, "prompt": "Anne", "max_tokens": 4, "ignore_eos": True}
    for seed in (2**64 - 1, -(2**63), 0, -1):
        assert _post(client, "/v1/completions", {**body, "seed": seed, "n": 2}).status_code == 200, seed
    same = [
        _post(client, "/v1/completions", {**body, "seed": 2**64 - 1}).json()["choices"][0]["text"] for _ in range(2)
    ]
    assert same[0] == same[1]
    for seed in (2**64, 2**70, -(2**63) - 1):
        err = api_error(_post(client, "/v1/completions", {**body, "seed": seed}), 400)
        assert err["param"] == "seed" and "9223372036854775808" in err["message"], err


SURROGATE = "a\ud800b"


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/completions", {"model": NAME, "prompt": SURROGATE}, "prompt"),
        ("/v1/completions", {"model": NAME, "prompt": ["ok", SURROGATE]}, "prompt.1"),
        ("/v1/completions", {"model": NAME, "prompt": "a", "stop": [SURROGATE]}, "stop.0"),
        ("/v1/completions", {"model": SURROGATE, "prompt": "a"}, "model"),
        ("/v1/completions", {"model": NAME, "prompt": "a", SURROGATE: 1}, "a\\ud800b"),
        (
            "/v1/chat/completions",
            {"model": NAME, "messages": [{"role": "user", "content": SURROGATE}]},
            "messages.0.content",
        ),
        ("/tokenize", {"prompt": SURROGATE}, "prompt"),
        (
            "/tokenize",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]},
            "messages.0.content.0.text",
        ),
    ],
)
def test_lone_surrogates_are_400_everywhere(client, path, body, param):
    err = api_error(_post(client, path, body), 400)
    assert "not valid Unicode" in err["message"]
    assert err["param"] == param
    json.dumps(err, ensure_ascii=False).encode("utf-8")  # the error itself is valid UTF-8


def test_invalid_utf8_bytes_are_400(client):
    raw = b'{"model": "tiny-dsf", "prompt": "\xff\xfe"}'
    api_error(client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"}), 400)


def test_malformed_json_has_no_offset_as_param(client):
    err = api_error(
        client.post("/v1/completions", content=b'{"model": ', headers={"Content-Type": "application/json"}), 400
    )
    assert err["param"] is None and "not valid JSON" in err["message"]


def test_request_body_limit_is_413(client):
    big = {"model": NAME, "prompt": "x" * (65 * 1024)}
    err = api_error(_post(client, "/v1/completions", big), 413)
    assert err["code"] == "request_too_large" and "65536" in err["message"]

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"model": "tiny-dsf", "prompt": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    api_error(client.post("/tokenize", content=chunks(), headers={"Content-Type": "application/json"}), 413)
    assert _post(client, "/tokenize", {"prompt": "x" * 1000}).status_code == 200


def test_api_key_is_checked_before_the_body(parts):
    with TestClient(_app(parts, api_key="k")) as c:
        c.app.state.server.loaded.wait(30)
        bad = c.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
        assert api_error(bad, 401)["code"] == "invalid_api_key"
        assert api_error(c.get("/v1/models/" + NAME), 401)["code"] == "invalid_api_key"
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
        auth = {"Authorization": "Bearer k"}
        assert c.get("/v1/models/" + NAME, headers=auth).json()["id"] == NAME


def test_retrieve_model(client):
    assert client.get(f"/v1/models/{NAME}").json()["id"] == NAME
    err = api_error(client.get("/v1/models/gpt-4"), 404)
    assert err["code"] == "model_not_found"


def test_served_schema_states_the_real_statuses(client):
    schema = client.get("/openapi.json").json()
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            assert "422" not in op["responses"], (path, method)
    completions = schema["paths"]["/v1/completions"]["post"]["responses"]
    assert {"200", "400", "401", "404", "413", "503"} <= set(completions)
    assert "text/event-stream" in completions["200"]["content"]
    assert list(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert completions["400"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")


def test_a_request_larger_than_the_server_is_400_not_503(client):
    body = {"model": NAME, "prompt": ["a"] * 20, "n": 16, "max_tokens": 1}  # 320 > 4 slots + 64 queued
    err = api_error(_post(client, "/v1/completions", body), 400)
    assert err["param"] == "n" and "320 generations" in err["message"]
