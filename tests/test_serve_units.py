"""`ragtune serve`'s parts without a model or a server: request parsing (every malformed request the
server must refuse, with its status and code), the Host allow-list, the exposure check, admission
(429 with Retry-After) and the batcher's isolation of a failing request."""

import asyncio
import json

import pytest

from ragtune.config import ConfigError
from ragtune.serve import (
    Admission,
    ApiError,
    Batcher,
    ServeConfig,
    allowed_host_names,
    check_exposure,
    check_host,
    exposure_warning,
    host_name,
    invalid_unicode_at,
    parse_chat_request,
)

SETTINGS = ServeConfig(token_env=None, max_body_bytes=8192, max_question_chars=300, max_tokens_cap=64)
JSON = {"Content-Type": "application/json"}


def chat(content="hi", **fields) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": content}], **fields}).encode()


# (body, headers, status, code): also sent to a running server in tests/test_serve.py and test_serve_http.py
MALFORMED = [
    (b"{not json", JSON, 400, "invalid_json"),
    (json.dumps({"model": "ragtune"}).encode(), JSON, 400, "invalid_request"),
    (json.dumps({"messages": []}).encode(), JSON, 400, "invalid_request"),
    (json.dumps({"messages": "hello"}).encode(), JSON, 400, "invalid_request"),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), JSON, 400, "invalid_request"),
    (json.dumps({"messages": [{"role": "system", "content": "hi"}]}).encode(), JSON, 400, "no_question"),
    (chat("   "), JSON, 400, "no_question"),
    (chat("x" * 301), JSON, 400, "question_too_long"),
    (chat(max_tokens=0), JSON, 400, "invalid_request"),
    (chat(model="gpt-9"), JSON, 404, "model_not_found"),
    (chat("x" * 9000), JSON, 413, "body_too_large"),
    (chat(temperature=5), JSON, 400, "invalid_request"),
    (chat(top_p="high"), JSON, 400, "invalid_request"),
    (chat(stream="yes"), JSON, 400, "invalid_request"),
    (chat(max_tokens=True), JSON, 400, "invalid_request"),
    (b"[" * 1500 + b"]" * 1500, JSON, 400, "invalid_json"),  # deep enough to exhaust Python's recursion
    # lone surrogates, as JSON escapes, wherever they are
    (b'{"messages": [{"role": "user", "content": "\\ud800 x"}]}', JSON, 400, "invalid_unicode"),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udfff"}]}]}', JSON, 400, "invalid_unicode"),
    (b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', JSON, 400, "invalid_unicode"),
    (b'{"messages": [{"role": "user", "content": "hi", "\\udc80": 1}]}', JSON, 400, "invalid_unicode"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "user": "\\ud83d"}', JSON, 400, "invalid_unicode"),
    # numbers Python will not convert, and JSON's non-numbers
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 5000 + b"}", JSON, 400, "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": -' + b"9" * 4400 + b"}", JSON, 400, "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', JSON, 400, "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}', JSON, 400, "invalid_json"),
    (chat(temperature=-0.5), JSON, 400, "invalid_request"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e400}', JSON, 400, "invalid_request"),
    # bytes that are not UTF-8 (Latin-1, UTF-16 with its BOM, a UTF-8 BOM)
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', JSON, 400, "invalid_json"),
    ("\ufeff".encode("utf-16-le") + chat().decode().encode("utf-16-le"), JSON, 400, "invalid_json"),
    (b"\xef\xbb\xbf" + chat(), JSON, 400, "invalid_json"),
    # media types: a web page's form or text/plain fetch, none at all, another charset
    (chat(), {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    (chat(), {"Content-Type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
    (chat(), {}, 415, "unsupported_media_type"),
    (chat(), {"Content-Type": "application/json; charset=latin-1"}, 415, "unsupported_media_type"),
    (chat(), {"Content-Type": "application/jsonx"}, 415, "unsupported_media_type"),
    # the rest of the schema
    (chat(n=2), JSON, 400, "invalid_request"),
    (chat(top_k=0), JSON, 400, "invalid_request"),
    (chat(top_k=21), JSON, 400, "invalid_request"),
    (chat(max_completion_tokens=-1), JSON, 400, "invalid_request"),
    (chat(stream=True, stream_options={"include_usage": "yes"}), JSON, 400, "invalid_request"),
    (json.dumps({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}).encode(), JSON, 400, "invalid_request"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(), JSON, 400, "no_question"),
    # OpenAI features a plain-text answer cannot honour: refused, never silently ignored
    (chat(tools=[{"type": "function", "function": {"name": "f"}}]), JSON, 400, "unsupported_parameter"),
    (chat(tool_choice="required"), JSON, 400, "unsupported_parameter"),
    (chat(response_format={"type": "json_object"}), JSON, 400, "unsupported_parameter"),
    (chat(logprobs=True, top_logprobs=5), JSON, 400, "unsupported_parameter"),
    (chat(), {**JSON, "Content-Encoding": "gzip"}, 415, "unsupported_media_type"),
    (b"null", JSON, 400, "invalid_request"),
    (b'"hello"', JSON, 400, "invalid_request"),
    (b"", JSON, 400, "invalid_json"),
]


@pytest.mark.parametrize(("body", "headers", "status", "code"), MALFORMED)
def test_malformed_requests_are_refused_with_status_and_code(body, headers, status, code):
    with pytest.raises(ApiError) as caught:
        parse_chat_request(body, headers, SETTINGS)
    err = caught.value
    assert (err.status, err.code) == (status, code), err.message
    body = err.body()
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["type"] == "invalid_request_error"
    json.dumps(body, ensure_ascii=False).encode("utf-8")  # what the response will send: never a lone surrogate


def test_errors_never_echo_text_that_is_not_unicode():
    model = "\ud800" * 3 + "x" * 500
    with pytest.raises(ApiError) as caught:  # even if a surrogate slipped past the check: escaped and cut
        parse_chat_request(json.dumps({"model": "x" * 500, "messages": [{"role": "user", "content": "hi"}]}).encode(),
                           JSON, SETTINGS)
    assert caught.value.status == 404 and len(caught.value.message) < 200
    assert "\\ud800" in ApiError(404, model).body()["error"]["message"]
    message = ApiError(400, model).body()["error"]["message"]
    assert len(message) < 530 and message.encode("utf-8")
    assert invalid_unicode_at({"a": [1, {"b": "ok", "c": ["\udfff"]}]}) == "a.1.c.0"
    assert invalid_unicode_at({"a": [1, {"b": "ok"}], "\u00e9": "\U0001F600"}) is None


def test_a_valid_request_becomes_question_budget_and_options():
    req = parse_chat_request(chat("  what?  ", max_tokens=10, top_k=2), JSON, SETTINGS)
    assert (req.question, req.max_tokens, req.top_k, req.stream, req.include_usage) == ("what?", 10, 2, False, False)
    assert parse_chat_request(chat(max_tokens=10**4000), JSON, SETTINGS).max_tokens == 64  # capped
    assert parse_chat_request(chat(max_completion_tokens=3, max_tokens=9), JSON, SETTINGS).max_tokens == 3
    streamed = parse_chat_request(chat(stream=True, stream_options={"include_usage": True}), JSON, SETTINGS)
    assert streamed.stream and streamed.include_usage
    assert not parse_chat_request(chat(stream_options={"include_usage": True}), JSON, SETTINGS).include_usage
    parts = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first"},
                          {"role": "assistant", "content": "ok"},
                          {"role": "user", "content": [{"type": "text", "text": "le "}, {"type": "image_url"},
                                                       {"type": "text", "text": "café 😀"}]}],
             "model": "ragtune", "temperature": 0, "seed": 10**100, "user": "u", "unknown_field": [1, None]}
    assert parse_chat_request(json.dumps(parts).encode(), JSON, SETTINGS).question == "le café 😀"
    plain = chat(response_format={"type": "text"}, tool_choice="none", tools=[], logprobs=False)
    assert parse_chat_request(plain, {**JSON, "Content-Encoding": "identity"}, SETTINGS).question == "hi"
    for content_type in ("application/json; charset=utf-8", "Application/JSON;charset=\"UTF-8\"", "application/json;"):
        assert parse_chat_request(chat(), {"content-type": content_type}, SETTINGS).question == "hi"


@pytest.mark.parametrize(("value", "name"), [
    ("127.0.0.1", "127.0.0.1"), ("127.0.0.1:8000", "127.0.0.1"), ("LocalHost:80", "localhost"), ("localhost:", "localhost"),
    ("[::1]:8000", "[::1]"), ("[0:0:0:0:0:0:0:1]", "[::1]"), ("::1", "[::1]"), ("example.com", "example.com"),
    ("", None), ("127.0.0.1:abc", None), ("[::1", None), ("[::1]x", None), ("[nothex]", None), ("a b", None),
    ("evil.com/x", None), ("host:99999999", None), ("exämple.com", None), ("-bad.com", None), ("a@b", None),
])
def test_host_names(value, name):
    assert host_name(value) == name


def test_host_allow_list():
    default = allowed_host_names(ServeConfig())
    assert default == {"127.0.0.1", "localhost", "[::1]"}
    check_host(["127.0.0.1:8000"], default)
    check_host(["[::1]:1"], default)
    for values, status in ((["evil.example"], 421), (["127.0.0.1.nip.io:8000"], 421), (["0.0.0.0:8000"], 421),
                           (["localhost."], 421), ([], 400), (["127.0.0.1", "127.0.0.1"], 400), (["bad host"], 400)):
        with pytest.raises(ApiError) as caught:
            check_host(values, default)
        assert caught.value.status == status
    assert allowed_host_names(ServeConfig(host="0.0.0.0")) == default  # a wildcard bind adds nothing
    assert allowed_host_names(ServeConfig(host="192.168.1.5", allowed_hosts=["box.lan"])) == {"box.lan", "192.168.1.5"}
    assert allowed_host_names(ServeConfig(allowed_hosts=["*"])) is None
    check_host([], None)
    with pytest.raises(ValueError):
        ServeConfig(allowed_hosts=["not a host"])


def test_exposure_needs_a_token_or_an_explicit_flag(monkeypatch):
    monkeypatch.delenv("RAGTUNE_TEST_EXPOSE", raising=False)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert check_exposure(ServeConfig(host=host, token_env="RAGTUNE_TEST_EXPOSE")) is None
    for host in ("0.0.0.0", "::", "192.168.1.5", "myhost", ""):
        settings = ServeConfig(host=host, token_env="RAGTUNE_TEST_EXPOSE")
        with pytest.raises(ConfigError, match="--insecure-no-token"):
            check_exposure(settings)
        assert "without a bearer token" in check_exposure(settings, insecure_no_token=True)
        assert exposure_warning(settings)
    monkeypatch.setenv("RAGTUNE_TEST_EXPOSE", "   ")  # blank is no token
    with pytest.raises(ConfigError):
        check_exposure(ServeConfig(host="0.0.0.0", token_env="RAGTUNE_TEST_EXPOSE"))
    monkeypatch.setenv("RAGTUNE_TEST_EXPOSE", "s3cret")
    assert check_exposure(ServeConfig(host="0.0.0.0", token_env="RAGTUNE_TEST_EXPOSE")) is None
    with pytest.raises(ConfigError, match="token_env"):
        check_exposure(ServeConfig(host="0.0.0.0", token_env=None))


def test_admission_counts_waiting_requests_and_answers_429_beyond():
    async def scenario():
        admission = Admission(max_concurrent=1, max_waiting=2)
        await admission.acquire_slot()  # one stream generating
        waiters = [asyncio.create_task(admission.acquire_slot()) for _ in range(2)]
        await asyncio.sleep(0)
        assert admission.waiting == 2
        with pytest.raises(ApiError) as caught:
            await admission.acquire_slot()
        assert caught.value.status == 429 and caught.value.headers == {"Retry-After": "2"}
        assert caught.value.body()["error"]["type"] == "rate_limit_error"
        with pytest.raises(ApiError):
            async with admission.queued():
                pass
        admission.release_slot()  # the first waiter gets the slot, a place in the queue frees up
        await asyncio.wait_for(waiters[0], 1)
        assert admission.waiting == 1
        async with admission.queued():
            assert admission.waiting == 2
        waiters[1].cancel()  # a waiter that gives up leaves the queue
        await asyncio.gather(waiters[1], return_exceptions=True)
        assert admission.waiting == 0
        admission.release_slot()
        await asyncio.wait_for(admission.acquire_slot(), 1)

    asyncio.run(scenario())


class PoisonBundle:
    """answer_many raises for a whole batch when one of its questions contains 'poison'."""

    def __init__(self):
        self.manifest = {"digest": "fake"}
        self.calls: list[list[str]] = []

    def answer_many(self, questions, top_k=None, max_new_tokens=None):
        self.calls.append(list(questions))
        if any("poison" in q for q in questions):
            raise ValueError("poisoned")
        return [{"question": q, "route": "reading", "text": q.upper(), "sources": []} for q in questions]


def test_batcher_answers_a_failed_batch_one_by_one():
    async def scenario():
        bundle = PoisonBundle()
        batcher = Batcher(bundle, max_batch=8, wait_s=0.05)
        questions = ["a", "b poison", "c", "d"]
        results = await asyncio.gather(*(batcher.answer(q, None, None) for q in questions), return_exceptions=True)
        assert [r["text"] if isinstance(r, dict) else type(r).__name__ for r in results] == ["A", "ValueError", "C", "D"]
        assert bundle.calls[0] == questions and sorted(map(tuple, bundle.calls[1:])) == [(q,) for q in questions]
        assert (await batcher.answer("e", None, None))["text"] == "E"  # the worker goes on

    asyncio.run(scenario())


def test_batcher_survives_a_wrong_number_of_answers():
    class Short(PoisonBundle):
        def answer_many(self, questions, top_k=None, max_new_tokens=None):
            return super().answer_many(questions)[:1]

    async def scenario():
        batcher = Batcher(Short(), max_batch=8, wait_s=0.05)
        results = await asyncio.gather(*(batcher.answer(q, None, None) for q in "ab"), return_exceptions=True)
        assert [r["text"] for r in results] == ["A", "B"]  # one by one, each got its one answer

    asyncio.run(asyncio.wait_for(scenario(), 10))
