"""HTTP routes and OpenAI-shaped errors, through FastAPI's test client."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from conftest import make_tiny_llama
from dsf_runtime.serve.app import create_app
from dsf_runtime.serve.engine import Engine
from tests_support import api_error, fail_on_call

NAME = "tiny-dsf"


def _loader(parts, **kw):
    model, tok = parts
    return lambda metrics: Engine(model, tok, max_model_len=kw.pop("max_model_len", 128), metrics=metrics, **kw)


def _ready(client: TestClient) -> TestClient:
    end = time.monotonic() + 30
    while client.get("/health").status_code != 200:
        assert time.monotonic() < end, client.get("/health").json()
        time.sleep(0.02)
    return client


@pytest.fixture(scope="module")
def client(parts):
    with TestClient(create_app(_loader(parts), NAME)) as c:
        yield _ready(c)


def _events(resp) -> list:
    """Parse an SSE body into JSON chunks; assert it ends with [DONE]."""
    lines = [line for line in resp.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_health_is_503_while_loading_then_200(parts):
    gate = threading.Event()
    inner = _loader(parts)

    def slow(metrics):
        gate.wait(30)
        return inner(metrics)

    with TestClient(create_app(slow, NAME)) as c:
        assert c.get("/health").status_code == 503 and c.get("/health").json()["status"] == "loading"
        err = api_error(c.post("/v1/completions", json={"model": NAME, "prompt": "a"}), 503)
        assert err["code"] == "loading"
        gate.set()
        assert _ready(c).get("/health").json() == {"status": "ok"}


def test_load_failure_is_reported(parts):
    def failing(metrics):
        raise RuntimeError("checkpoint is corrupt")

    with TestClient(create_app(failing, NAME)) as c:
        end = time.monotonic() + 10
        while c.get("/health").json()["status"] == "loading" and time.monotonic() < end:
            time.sleep(0.02)
        resp = c.get("/health")
        assert resp.status_code == 503 and "checkpoint is corrupt" in resp.json()["message"]
        assert (
            "checkpoint is corrupt"
            in api_error(c.post("/v1/completions", json={"model": NAME, "prompt": "a"}), 503)["message"]
        )


def test_models(client):
    data = client.get("/v1/models").json()
    assert data["object"] == "list" and [m["id"] for m in data["data"]] == [NAME]
    assert data["data"][0]["max_model_len"] == 128


def test_completion_shape_and_greedy_text(client, parts):
    from dsf_runtime.generate import generate_text

    body = {"model": NAME, "prompt": "Elizabeth was", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    data = client.post("/v1/completions", json=body).json()
    assert data["id"].startswith("cmpl-") and data["object"] == "text_completion" and data["model"] == NAME
    assert isinstance(data["created"], int)
    (choice,) = data["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["logprobs"] is None
    model, tok = parts
    assert choice["text"] == generate_text(model, tok, "Elizabeth was", 8, fixed_length=True).text
    n_prompt = len(tok("Elizabeth was")["input_ids"])
    assert data["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 8, "total_tokens": n_prompt + 8}


def test_completion_variants(client):
    # several prompts x n, token-id prompts, echo, logprobs
    tokens = client.post("/v1/completions", json={"model": NAME, "prompt": [[5, 6, 7], [8, 9]], "max_tokens": 3})
    assert len(tokens.json()["choices"]) == 2 and tokens.json()["usage"]["prompt_tokens"] == 5
    body = {
        "model": NAME,
        "prompt": ["Anne", "Emma"],
        "n": 2,
        "max_tokens": 4,
        "seed": 3,
        "ignore_eos": True,
        "logprobs": 2,
    }
    data = client.post("/v1/completions", json=body).json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
    lp = data["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    assert all(len(top) <= 2 for top in lp["top_logprobs"])
    assert data["usage"]["completion_tokens"] == 16
    echo = client.post(
        "/v1/completions", json={"model": NAME, "prompt": "Anne", "echo": True, "max_tokens": 2, "temperature": 0}
    ).json()
    assert echo["choices"][0]["text"].startswith("Anne")


def test_completion_stream(client):
    body = {
        "model": NAME,
        "prompt": "Mr. Darcy",
        "max_tokens": 6,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with client.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        resp.read()
    chunks = _events(resp)
    full = client.post("/v1/completions", json={**body, "stream": False, "stream_options": None}).json()
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == full["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert all(c["usage"] is None for c in chunks[:-1])


def test_chat_and_chat_stream(client):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Who is Emma?"}]},
    ]
    body = {"model": NAME, "messages": messages, "max_completion_tokens": 6, "temperature": 0, "ignore_eos": True}
    data = client.post("/v1/chat/completions", json=body).json()
    assert data["id"].startswith("chatcmpl-") and data["object"] == "chat.completion"
    msg = data["choices"][0]["message"]
    assert msg["role"] == "assistant" and data["choices"][0]["finish_reason"] == "length"
    with client.stream(
        "POST", "/v1/chat/completions", json={**body, "stream": True, "logprobs": True, "top_logprobs": 2}
    ) as resp:
        resp.read()
    chunks = _events(resp)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == msg["content"]
    content = [e for c in chunks[1:] if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    assert len(content) == 6 and all(len(e["top_logprobs"]) == 2 for e in content)


def test_chat_without_template_is_400(tiny_tokenizer):
    model = make_tiny_llama(384)
    with TestClient(create_app(lambda m: Engine(model, tiny_tokenizer, max_model_len=64, metrics=m), NAME)) as c:
        err = api_error(
            _ready(c).post(
                "/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": "hi"}]}
            ),
            400,
        )
        assert "chat template" in err["message"]


@pytest.mark.parametrize(
    "body,param,fragment",
    [
        ({"model": NAME, "prompt": "a", "temperature": 5}, "temperature", "less than or equal to 2"),
        ({"model": NAME}, "prompt", "required"),
        ({"model": NAME, "prompt": "a", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"model": NAME, "prompt": "a", "n": "x"}, "n", "integer"),
        ({"model": NAME, "prompt": []}, "prompt", "empty"),
        ({"model": NAME, "prompt": "a", "stop": ["", "b"]}, "stop", "empty"),
        ({"model": NAME, "prompt": "a", "stream_options": {"include_usage": True}}, None, "stream"),
        ({"model": NAME, "prompt": "a", "frequency_penalty": 1.0}, None, "repetition_penalty"),
    ],
)
def test_invalid_parameters_are_400(client, body, param, fragment):
    err = api_error(client.post("/v1/completions", json=body), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param and fragment in err["message"]


def test_bad_json_and_unknown_model(client):
    err = api_error(
        client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400
    )
    assert "JSON" in err["message"]
    err = api_error(client.post("/v1/completions", json={"model": "gpt-4", "prompt": "a"}), 404)
    assert err["code"] == "model_not_found" and "gpt-4" in err["message"] and NAME in err["message"]
    api_error(
        client.post("/v1/chat/completions", json={"model": "gpt-4", "messages": [{"role": "user", "content": "a"}]}),
        404,
    )


def test_context_overflow_names_the_numbers(client, parts):
    _, tok = parts
    prompt = "Anne " * 20
    n = len(tok(prompt)["input_ids"])
    err = api_error(client.post("/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 128}), 400)
    assert err["code"] == "context_length_exceeded"
    assert "128" in err["message"] and str(n) in err["message"] and str(n + 128) in err["message"]
    err = api_error(client.post("/v1/completions", json={"model": NAME, "prompt": [5, 999999]}), 400)
    assert "vocabulary" in err["message"]


def test_unknown_fields_are_ignored_with_a_warning(client, caplog):
    with caplog.at_level("WARNING", logger="dsf_runtime.serve"):
        resp = client.post(
            "/v1/completions", json={"model": NAME, "prompt": "a", "max_tokens": 2, "frobnicate": 1, "tools": []}
        )
    assert resp.status_code == 200
    assert "frobnicate" in caplog.text and "tools" in caplog.text


def test_api_key(parts):
    with TestClient(create_app(_loader(parts), NAME, api_key="s3cret")) as c:
        _ready(c)
        body = {"model": NAME, "prompt": "a", "max_tokens": 2}
        assert api_error(c.post("/v1/completions", json=body), 401)["code"] == "invalid_api_key"
        api_error(c.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
        api_error(c.get("/v1/models"), 401)
        ok = c.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.get("/health").status_code == 200  # probes need no key


def test_tokenize_round_trip(client, parts):
    _, tok = parts
    data = client.post("/tokenize", json={"model": NAME, "prompt": "Pride and Prejudice"}).json()
    assert data["tokens"] == tok("Pride and Prejudice")["input_ids"] and data["count"] == len(data["tokens"])
    back = client.post("/detokenize", json={"model": NAME, "tokens": data["tokens"]}).json()
    assert back["prompt"].endswith("Pride and Prejudice")
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 2
    api_error(client.post("/detokenize", json={"tokens": [-1]}), 400)
    api_error(client.post("/tokenize", json={"prompt": "a", "messages": [{"role": "user", "content": "b"}]}), 400)


def test_metrics_count_what_happened(client):
    client.post("/v1/completions", json={"model": NAME, "prompt": "Anne", "max_tokens": 5, "ignore_eos": True})
    text = client.get("/metrics").text
    for name in (
        "dsf_time_to_first_token_seconds_count",
        "dsf_inter_token_latency_seconds_count",
        "dsf_e2e_request_latency_seconds_count",
        "dsf_request_queue_time_seconds_count",
    ):
        value = float(next(line for line in text.splitlines() if line.startswith(name)).split()[-1])
        assert value >= 1, name
    generated = next(line for line in text.splitlines() if line.startswith("dsf_generation_tokens_total"))
    assert float(generated.split()[-1]) >= 5
    assert "dsf_num_requests_running" in text and "dsf_num_requests_waiting" in text
    assert "dsf_prompt_tokens_total" in text


def test_engine_failure_mid_stream_is_an_error_chunk_then_the_engine_restarts(parts):
    app = create_app(_loader(parts, max_restarts=1), NAME)
    with TestClient(app) as c:
        engine = _ready(c).app.state.server.engine
        engine.runner.decode = fail_on_call(engine.runner.decode, 3, RuntimeError("device lost"))
        body = {"model": NAME, "prompt": "Anne", "max_tokens": 20, "ignore_eos": True, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as resp:
            resp.read()
        chunks = _events(resp)  # ends with [DONE]
        assert "device lost" in chunks[-1]["error"]["message"]
        assert any(ch.get("choices") for ch in chunks[:-1])  # tokens before the failure were delivered
        assert c.get("/health").status_code == 200  # restarted, not dead
        assert 'dsf_engine_restarts_total{model_name="tiny-dsf"} 1.0' in c.get("/metrics").text
        ok = c.post("/v1/completions", json={"model": NAME, "prompt": "a", "max_tokens": 3, "ignore_eos": True})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3

        def broken(*args, **kwargs):
            raise RuntimeError("device lost for good")

        engine.runner.decode = broken  # the second failure within the window exhausts max_restarts=1
        failed = c.post("/v1/completions", json={"model": NAME, "prompt": "a", "max_tokens": 3})
        assert api_error(failed, 500)["message"].startswith("engine error")
        end = time.monotonic() + 10
        while engine.alive:
            assert time.monotonic() < end
            time.sleep(0.01)
        health = c.get("/health")
        assert health.status_code == 503 and "device lost for good" in health.json()["message"]
        assert api_error(c.post("/v1/completions", json={"model": NAME, "prompt": "a"}), 503)["code"] == "engine_dead"
