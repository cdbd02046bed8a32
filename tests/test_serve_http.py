"""`ragtune serve` over loopback HTTP with a fake bundle (no model: fast), as a hostile client: one
request's failure never fails its batch neighbours, lone surrogates and huge integers are 4xx, the
token is checked before anything else under /v1, the Host allow-list (DNS rebinding), JSON-only
POSTs, HTTP-layer errors in OpenAI's shape (also those uvicorn answers itself), a client hanging
up mid-body, the exposure warning on /healthz and the page."""

import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
import pytest

from ragtune import serve
from ragtune.serve import ServeConfig, create_app, serve_in_thread
from tests.test_serve_units import MALFORMED

TOKEN_ENV = "RAGTUNE_TEST_HTTP_TOKEN"


@dataclass
class FakePrepared:
    question: str
    route: str = "reading"
    sources: list = field(default_factory=list)
    route_note: str | None = None


class FakeBundle:
    """Echoes questions. A batch holding 'poison' fails whole (as a real batched generate would);
    'too long' is refused as the real bundle refuses a prompt over the model's context; 'crash'
    fails a stream after its first piece; streams stop when cancelled."""

    def __init__(self):
        self.manifest = {"digest": "fake-digest"}
        self.batches: list[list[str]] = []
        self.cancels: list[threading.Event] = []  # each stream's: set when its client has gone

    def _check(self, question):
        if "too long" in question and serve.PROMPT_TOO_LONG:
            raise serve.PROMPT_TOO_LONG("the question does not fit the model's 2048 positions")

    def answer_many(self, questions, top_k=None, max_new_tokens=None):
        self.batches.append(list(questions))
        for q in questions:
            self._check(q)
        if any("poison" in q for q in questions):
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
        time.sleep(0.05)
        return [self.finish(FakePrepared(q), f"echo: {q}", {"prompt_tokens": 3, "completion_tokens": 2,
                                                             "finish_reason": "stop"}) for q in questions]

    def prepare(self, question, top_k=None, max_new_tokens=None):
        self._check(question)
        return FakePrepared(question)

    def stream(self, prepared, cancel=None, stats=None):
        self.cancels.append(cancel)
        for i in range(200 if "slow" in prepared.question else 3):
            if cancel.is_set():
                return
            if "crash" in prepared.question and i == 1:
                raise RuntimeError("generator broke")
            time.sleep(0.02)
            yield f"w{i} "
        if stats is not None:
            stats.update(prompt_tokens=3, completion_tokens=3, finish_reason="stop")

    def finish(self, prepared, text, usage=None):
        return {"question": prepared.question, "route": prepared.route, "text": text, "sources": [],
                "final_answer": text} | ({"usage": usage} if usage else {})


@pytest.fixture(scope="module")
def bundle():
    return FakeBundle()


@pytest.fixture(scope="module")
def server(bundle):
    settings = ServeConfig(token_env=TOKEN_ENV, max_body_bytes=8192, max_question_chars=300, max_concurrent=1,
                           batch_wait_ms=200)
    with serve_in_thread(create_app(bundle, settings)) as url:
        yield url


@pytest.fixture()
def records():
    """Log records of uvicorn and ragtune while the test runs (attached after the server configured logging)."""
    seen: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = seen.append
    loggers = [logging.getLogger("uvicorn"), logging.getLogger("ragtune")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    yield seen
    for logger, level in zip(loggers, levels):
        logger.removeHandler(handler)
        logger.setLevel(level)


def post(url, body, headers=None, **kwargs):
    return httpx.post(f"{url}/v1/chat/completions", content=body,
                      headers={"Content-Type": "application/json"} | (headers or {}), timeout=30, **kwargs)


def chat(question, **fields):
    return json.dumps({"messages": [{"role": "user", "content": question}], **fields}, ensure_ascii=False).encode()


def is_openai_error(resp, status, code=None):
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    error = resp.json()["error"]
    assert isinstance(error["message"], str) and error["type"] and "param" in error
    return code is None or error["code"] == code


def raw(url, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes on a fresh connection and read the answer until the server closes it."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def host_of(url):
    return urlsplit(url).netloc


# --------------------------------------------------------------------------- one request, one fate


def test_one_poisoned_request_fails_alone_in_its_batch(server, bundle):
    questions = ["one", "poison two", "three", "four"]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda q: post(server, chat(q)), questions))
    assert [r.status_code for r in responses] == [200, 500, 200, 200]
    assert [r.json()["choices"][0]["message"]["content"] for r in responses if r.status_code == 200] == \
        ["echo: one", "echo: three", "echo: four"]
    assert is_openai_error(responses[1], 500, "generation_failed")
    assert responses[1].json()["error"]["type"] == "server_error"
    assert any(len(batch) > 1 for batch in bundle.batches)  # they were batched, then answered one by one


def test_a_lone_surrogate_is_a_400_and_its_neighbours_are_answered(server):
    bodies = [chat("good one"), b'{"messages": [{"role": "user", "content": "\\ud800 x"}]}', chat("good two"),
              chat("good three")]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda b: post(server, b), bodies))
    assert [r.status_code for r in responses] == [200, 400, 200, 200]
    assert is_openai_error(responses[1], 400, "invalid_unicode")


def test_surrogate_model_and_huge_integers_are_4xx(server):
    resp = post(server, b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}')
    assert is_openai_error(resp, 400, "invalid_unicode")
    resp = post(server, b'{"model": "gpt-\\u00e9\\ud83d\\ude00", "messages": [{"role": "user", "content": "hi"}]}')
    assert is_openai_error(resp, 404, "model_not_found") and "gpt-é😀" in resp.json()["error"]["message"]
    resp = post(server, b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 4400 + b"}")
    assert is_openai_error(resp, 400, "invalid_json")


@pytest.mark.skipif(not serve.PROMPT_TOO_LONG, reason="this ragtune.bundle has no PromptTooLong")
def test_a_prompt_too_long_is_a_400_plain_or_streamed(server):
    for stream in (False, True):
        resp = post(server, chat("far too long", stream=stream))
        assert is_openai_error(resp, 400, "context_length_exceeded")
    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(lambda q: post(server, chat(q)), ["too long here", "fine"]))
    assert [r.status_code for r in responses] == [400, 200]


@pytest.mark.parametrize(("body", "headers", "status", "code"), MALFORMED)
def test_malformed_requests_over_http(server, body, headers, status, code):
    resp = httpx.post(f"{server}/v1/chat/completions", content=body, headers=headers, timeout=30)
    assert is_openai_error(resp, status, code)


def test_streams_and_their_errors(server, bundle):
    with httpx.stream("POST", f"{server}/v1/chat/completions", content=chat("hello", stream=True),
                      headers={"Content-Type": "application/json"}, timeout=30) as resp:
        events = [line for line in resp.iter_lines() if line]
    assert resp.status_code == 200 and events[-1] == "data: [DONE]"
    with httpx.stream("POST", f"{server}/v1/chat/completions", content=chat("crash", stream=True),
                      headers={"Content-Type": "application/json"}, timeout=30) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line]
    assert events[-1]["error"]["type"] == "server_error" and events[-1]["error"]["code"] == "generation_failed"
    assert post(server, chat("after")).status_code == 200


def test_clients_leaving_streams_give_their_slot_back(server, bundle):
    """max_concurrent is 1: twenty clients hanging up (some before the first event) must not keep it."""
    bundle.cancels.clear()
    for i in range(20):
        with httpx.stream("POST", f"{server}/v1/chat/completions", content=chat("slow", stream=True),
                          headers={"Content-Type": "application/json"}, timeout=30) as resp:
            if i % 2:
                next(resp.iter_lines())
    started = time.monotonic()
    with httpx.stream("POST", f"{server}/v1/chat/completions", content=chat("hello", stream=True),
                      headers={"Content-Type": "application/json"}, timeout=30) as resp:
        assert resp.status_code == 200 and list(resp.iter_lines())[-2] == "data: [DONE]"
    assert time.monotonic() - started < 10
    # every stream that lost its client was told to stop generating (the real generator checks at each token)
    assert len(bundle.cancels) >= 11 and all(cancel.wait(5) for cancel in bundle.cancels)


# --------------------------------------------------------------------------- the token, before anything


def test_the_token_comes_before_paths_and_methods(server, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    for method, path in (("GET", "/v1/nothing"), ("POST", "/v1/completions"), ("GET", "/v1/chat/completions"),
                         ("DELETE", "/v1/models"), ("GET", "/v1"), ("GET", "/v1/"), ("GET", "/v1/models/gpt-9"),
                         ("GET", "/openapi.json"), ("HEAD", "/v1/models/ragtune"), ("OPTIONS", "/v1/models"),
                         ("POST", "/v1/chat/completions"), ("GET", "/v1/models/"), ("GET", "/v1/%2e%2e/healthz")):
        resp = httpx.request(method, f"{server}{path}", content=b"{}", headers={"Content-Type": "text/plain"})
        assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer", (method, path)
        if method != "HEAD":
            assert is_openai_error(resp, 401, "invalid_api_key")
    auth = {"Authorization": "Bearer s3cret"}
    assert httpx.get(f"{server}/v1/nothing", headers=auth).status_code == 404
    assert httpx.get(f"{server}/v1/chat/completions", headers=auth).status_code == 405
    assert httpx.get(f"{server}/openapi.json", headers=auth).json()["info"]["title"] == "ragtune"
    assert httpx.head(f"{server}/v1/models/ragtune", headers=auth).status_code == 200
    assert httpx.get(f"{server}/healthz").json()["token_required"] is True
    monkeypatch.delenv(TOKEN_ENV)
    assert httpx.head(f"{server}/v1/models/ragtune").status_code == 200
    assert httpx.get(f"{server}/openapi.json").status_code == 200


def test_unknown_paths_echo_nothing_undecodable(server):
    resp = httpx.get(f"{server}/v1/%ED%A0%80" + "x" * 300)
    assert is_openai_error(resp, 404, "not_found") and len(resp.json()["error"]["message"]) < 200
    resp = httpx.get(f"{server}/v1/models/%ED%A0%80")
    assert is_openai_error(resp, 404, "model_not_found")


# --------------------------------------------------------------------------- Host, media type, HTTP layer


def test_host_header_allow_list(server):
    hostport = host_of(server)
    port = hostport.rsplit(":", 1)[1]
    for host in (hostport, f"localhost:{port}", "127.0.0.1", f"[::1]:{port}", "LOCALHOST"):
        assert httpx.get(f"{server}/healthz", headers={"Host": host}).status_code == 200, host
    for host, status in ((f"evil.example:{port}", 421), (f"0.0.0.0:{port}", 421), ("127.0.0.1.nip.io", 421),
                         ("bad host", 400), ("127.0.0.1:x", 400), ("", 400)):
        for path in ("/", "/healthz", "/v1/models"):
            resp = httpx.get(f"{server}{path}", headers={"Host": host})
            assert is_openai_error(resp, status, "host_not_allowed" if status == 421 else "bad_host"), (host, path)
    # HTTP/1.0 may leave Host out: the app refuses it; HTTP/1.1 must not: uvicorn refuses it (as JSON too)
    status, _, body = raw(server, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert status == 400 and json.loads(body)["error"]["code"] == "bad_host"
    status, _, body = raw(server, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert status == 400 and json.loads(body)["error"]["code"] == "bad_http_request"


def test_a_web_page_cannot_post_form_or_text(server):
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        resp = post(server, chat("hi"), headers={"Content-Type": content_type})
        assert is_openai_error(resp, 415, "unsupported_media_type")
    assert httpx.options(f"{server}/v1/chat/completions").status_code == 405  # no CORS preflight answered
    assert "access-control-allow-origin" not in post(server, chat("hi"), headers={"Origin": "http://evil.example"}).headers


@pytest.mark.parametrize("request_bytes", [
    b"NOT A REQUEST\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\n\r\n",
    b"GET /h\xffz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: " + b"9" * 30 + b"\r\n\r\n",
])
def test_http_layer_errors_are_openai_shaped(server, request_bytes, records):
    status, headers, body = raw(server, request_bytes)
    assert status == 400 and headers["content-type"] == "application/json", body
    assert json.loads(body)["error"]["code"] == "bad_http_request"
    assert httpx.get(f"{server}/healthz").status_code == 200
    assert not [r for r in records if r.exc_info]


def test_oversized_headers_are_refused(server):
    resp = httpx.get(f"{server}/healthz", headers={"X-Big": "a" * 70000})
    assert is_openai_error(resp, 431, "headers_too_large")
    # a head still incomplete past 16 KiB: h11's own limit, answered by uvicorn (as JSON, by h11_protocol)
    status, _, body = raw(server, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20000)
    assert status == 400 and json.loads(body)["error"]["code"] == "bad_http_request"


def test_a_client_hanging_up_mid_body_is_one_log_line(server, records):
    with socket.create_connection((urlsplit(server).hostname, urlsplit(server).port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"messages\": [")
        time.sleep(0.3)
    deadline = time.monotonic() + 5
    while not any("hung up" in r.getMessage() for r in records) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [r.getMessage() for r in records if "hung up" in r.getMessage()][:1]
    assert not [r for r in records if r.exc_info], [r.getMessage() for r in records]
    assert post(server, chat("still here")).status_code == 200


def test_an_unexpected_error_is_a_json_500():
    broken = FakeBundle()
    broken.manifest = None  # /healthz reads its digest: AttributeError
    with serve_in_thread(create_app(broken, ServeConfig(token_env=None))) as url:
        resp = httpx.get(f"{url}/healthz")
    assert is_openai_error(resp, 500, "internal_error")


# --------------------------------------------------------------------------- exposure


def test_an_exposed_server_without_token_says_so_on_healthz_and_the_page(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    exposed = ServeConfig(host="0.0.0.0", token_env=TOKEN_ENV)
    with serve_in_thread(create_app(FakeBundle(), exposed)) as url:  # bound to loopback all the same
        health = httpx.get(f"{url}/healthz").json()
        page = httpx.get(f"{url}/").text
        monkeypatch.setenv(TOKEN_ENV, "s3cret")
        assert "warning" not in httpx.get(f"{url}/healthz").json()
    assert "without a bearer token" in health["warning"] and health["token_required"] is False
    assert 'id="warning"' in page and "/healthz" in page
    assert "localStorage.setItem" not in page  # the token stays in memory
