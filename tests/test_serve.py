"""`ragtune serve` on loopback with the real model: the official openai client (plain and streaming),
20 concurrent requests, malformed requests answered 4xx while the server keeps serving, one bad
request among batched ones failing alone, the bearer token, and the vLLM command the vllm backend
runs. (Request parsing, admission and the guards without a model: test_serve_units.py and
test_serve_http.py.)"""

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

from ragtune.bundle import Bundle
from ragtune.engine import vllm_command
from ragtune.serve import Batcher, ServeConfig, create_app, serve_in_thread
from tests.bundle_fixtures import MATHS_QUESTION, READING_QUESTION, build_small_bundle
from tests.test_serve_units import MALFORMED

TOKEN_ENV = "RAGTUNE_TEST_TOKEN"


@pytest.fixture(scope="module")
def bundle(mirror, base_generator, tmp_path_factory):
    return Bundle.load(build_small_bundle(mirror, base_generator, tmp_path_factory.mktemp("serve")))


@pytest.fixture(scope="module")
def server(bundle):
    settings = ServeConfig(token_env=TOKEN_ENV, max_body_bytes=8192, max_question_chars=300, max_concurrent=2)
    with serve_in_thread(create_app(bundle, settings)) as url:
        yield url


@pytest.fixture()
def client(server):
    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, question, **kwargs):
    return client.chat.completions.create(model="ragtune", messages=[{"role": "user", "content": question}], **kwargs)


def test_binds_loopback_by_default():
    assert ServeConfig().host == "127.0.0.1"


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["ragtune"]
    health = httpx.get(f"{server}/healthz").json()
    assert health["status"] == "ok" and health["bundle_digest"]


def test_openai_client_reading_answer_with_sources(client):
    resp = ask(client, READING_QUESTION)
    assert isinstance(resp.choices[0].message.content, str) and resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    extra = resp.model_extra["ragtune"]
    assert extra["route"] == "reading"
    assert 1 <= len(extra["sources"]) <= 3 and extra["sources"][0]["chunk_id"].startswith("DEV_0-")


def test_openai_client_streaming_equals_plain(client):
    plain = ask(client, MATHS_QUESTION)
    chunks = list(ask(client, MATHS_QUESTION, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == plain.choices[0].message.content
    extras = [c.model_extra.get("ragtune") for c in chunks if c.model_extra.get("ragtune")]
    assert extras[0]["route"] == "maths" and extras[0]["sources"] == []
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert "final_answer" in extras[-1] and finals[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage  # include_usage: a last usage chunk


def test_a_cut_off_answer_says_length_and_counts_its_tokens(client):
    for resp in (ask(client, READING_QUESTION, max_tokens=2), ask(client, "2+2?", max_tokens=5)):
        assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens in (2, 5)
        assert "\ufffd" not in resp.choices[0].message.content
    chunks = list(ask(client, "2+2?", max_tokens=5, stream=True))
    assert "\ufffd" not in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_a_client_leaving_a_stream_stops_its_generation(server, client):
    import time

    with httpx.stream("POST", f"{server}/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": MATHS_QUESTION}], "max_tokens": 1000, "stream": True}) as resp:
        next(resp.iter_lines())  # the first event, then hang up
    started = time.monotonic()
    assert ask(client, "2+2?", max_tokens=2).choices[0].finish_reason == "length"
    # 1,000 abandoned tokens take minutes on CPU; a stopped generation frees the model at once
    assert time.monotonic() - started < 30


def test_twenty_concurrent_requests_all_answered(client):
    questions = [READING_QUESTION if i % 2 else MATHS_QUESTION for i in range(20)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        # One passage per reading question (ragtune's `top_k` extension) keeps the prompts short.
        responses = list(pool.map(lambda q: ask(client, q, max_tokens=1, extra_body={"top_k": 1}), questions))
    routes = [r.model_extra["ragtune"]["route"] for r in responses]
    assert routes == ["reading" if i % 2 else "maths" for i in range(20)]
    assert all(isinstance(r.choices[0].message.content, str) for r in responses)
    assert all(len(r.model_extra["ragtune"]["sources"]) == (1 if i % 2 else 0) for i, r in enumerate(responses))


@pytest.mark.parametrize(("body", "headers", "status", "code"), MALFORMED)
def test_malformed_requests_get_4xx_and_the_server_keeps_serving(server, body, headers, status, code):
    resp = httpx.post(f"{server}/v1/chat/completions", content=body, headers=headers)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code
    assert httpx.get(f"{server}/healthz").status_code == 200


def test_a_lone_surrogate_fails_alone_among_batched_requests(server):
    bodies = [json.dumps({"messages": [{"role": "user", "content": q}], "max_tokens": 1}).encode()
              for q in (MATHS_QUESTION, "2+2?", READING_QUESTION)]
    bodies.insert(1, b'{"messages": [{"role": "user", "content": "\\ud800 x"}], "max_tokens": 1}')
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda b: httpx.post(f"{server}/v1/chat/completions", content=b, timeout=120,
                                                       headers={"Content-Type": "application/json"}), bodies))
    assert [r.status_code for r in responses] == [200, 400, 200, 200]
    assert responses[1].json()["error"]["code"] == "invalid_unicode"
    assert [responses[i].json()["ragtune"]["route"] for i in (0, 3)] == ["maths", "reading"]


def test_the_batcher_isolates_a_question_the_model_cannot_take(bundle):
    """Past the parser's check, a lone surrogate breaks the real bundle's batched call: only its own
    request fails, the others are answered one by one."""

    async def scenario():
        batcher = Batcher(bundle, max_batch=8, wait_s=0.2)
        questions = ["2+2?", "\ud800 x", "3+5?"]
        return await asyncio.gather(*(batcher.answer(q, 1, 1) for q in questions), return_exceptions=True)

    results = asyncio.run(scenario())
    assert isinstance(results[1], Exception)
    assert all(isinstance(results[i]["text"], str) for i in (0, 2))


def test_unknown_paths_and_methods_get_openai_shaped_errors(server, client):
    for method, path, status in (("GET", "/v1/chat/completions", 405), ("POST", "/v1/completions", 404),
                                 ("DELETE", "/v1/models", 405)):
        resp = httpx.request(method, f"{server}{path}")
        assert resp.status_code == status and path in resp.json()["error"]["message"]
    assert all(httpx.head(f"{server}{path}").status_code == 200
               for path in ("/", "/healthz", "/v1/models", "/v1/models/ragtune"))
    assert client.models.retrieve("ragtune").id == "ragtune"
    assert httpx.get(f"{server}/v1/models/gpt-9").json()["error"]["code"] == "model_not_found"


def test_server_still_answers_after_bad_requests(server, client):
    httpx.post(f"{server}/v1/chat/completions", content=b"\xff\xfe", headers={"Content-Type": "application/json"})
    assert ask(client, MATHS_QUESTION, max_tokens=2).model_extra["ragtune"]["route"] == "maths"


def test_bearer_token_when_configured(server, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    denied = httpx.get(f"{server}/v1/models")
    assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{server}/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert httpx.get(f"{server}/v1/models", headers={"Authorization": "bearer s3cret"}).status_code == 200
    assert httpx.get(f"{server}/healthz").status_code == 200  # liveness stays open


def test_web_chat_page_is_served(server):
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text


def test_vllm_command_serves_base_with_the_adapter_as_lora(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8}))
    cmd = vllm_command("models/base/generator", adapter, port=8011, extra_args=["--dtype", "float32"])
    assert cmd[:3] == ["vllm", "serve", "models/base/generator"]
    assert cmd[cmd.index("--lora-modules") + 1] == f"ragtune={adapter}"
    assert "--enable-lora" in cmd and cmd[cmd.index("--max-lora-rank") + 1] == "8"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "8011"
    assert cmd[-2:] == ["--dtype", "float32"]
    assert "--enable-lora" not in vllm_command("base", None)
