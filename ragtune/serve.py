"""`ragtune serve`: a bundle behind an OpenAI-compatible API and a web chat page.

    GET  /                      the web chat (route, retrieved passages, answer)
    GET  /healthz               liveness, the bundle's digest, and a warning when exposed without a token
    GET  /v1/models             the one model, "ragtune" (and /v1/models/ragtune)
    POST /v1/chat/completions   OpenAI chat completions, plain or streaming (SSE); the last user
                                message is the question. Responses carry an extra `ragtune` object
                                (route, sources, final_answer) that OpenAI clients ignore.

Guards, in the order a request meets them:
- `Guard` (ASGI middleware, before any routing): the Host header must name one of `allowed_hosts`
  (ports ignored), so that a web page cannot reach the server through DNS rebinding (400 when missing
  or malformed, 421 when not allowed); then, when the environment variable named by `token_env` is
  set, every /v1/... path and /openapi.json need `Authorization: Bearer <token>`, checked before
  the path or method is looked at, so an unauthenticated client learns nothing (401).
- `parse_chat_request` (a pure function): `Content-Type: application/json` (415 otherwise, which also
  keeps cross-site form posts out), a size limit (413), strict UTF-8 JSON without NaN/Infinity,
  no lone surrogates anywhere, OpenAI's schema and ranges, the model's name, a question (400/404).
- `Admission`: at most `max_waiting` requests wait or generate (429 with Retry-After beyond that);
  streams hold one of `max_concurrent` slots, taken before the 200 so a full server is a 429.
- `Batcher`: concurrent plain requests share batched generate calls, up to `max_batch`; when a
  batched call fails, its requests are answered one by one, so only a failing request gets its 500.
Every error the app answers has OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
and never echoes text that is not valid Unicode. The server binds 127.0.0.1 unless told otherwise;
`ragtune serve` refuses any other address without a token unless given `--insecure-no-token`
(`check_exposure`), and then /healthz carries a `warning` that the web page shows as a banner.

What uvicorn answers itself, before the app sees a request: a request line or header h11 cannot
parse, an HTTP/1.1 request without a Host header or with several, a bad Content-Length, a head
over 16 KiB arriving in pieces (`Guard` refuses any head over 16 KiB
with 431). `h11_protocol()` gives those 400s OpenAI's JSON shape too (uvicorn's own are plain text);
a connection that breaks off mid-request is closed without an answer.
A request body that breaks off mid-way (client hang-up) is logged as one line, not a traceback.

`backend: vllm` starts `vllm serve <base> --enable-lora --lora-modules ragtune=<adapter>`
(ragtune.engine) and sends generation to it through the same OpenAI client the eval stage uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# Request at module level: the endpoints' annotations must resolve here.
from fastapi import Request
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
)
from starlette.datastructures import Headers
from starlette.responses import StreamingResponse

from ragtune import bundle as _bundle
from ragtune.bundle import Bundle
from ragtune.config import Config, ConfigError
from ragtune.engine import MODEL_ID

STATIC = Path(__file__).parent / "static"
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "[::1]"]
RETRY_AFTER_S = 2
MAX_HEADER_BYTES = 16384  # h11's own limit, which it applies only to a head that arrives in pieces
# A question whose prompt cannot fit the model's context (ragtune.bundle): the asker's to fix, a 400.
PROMPT_TOO_LONG: Any = getattr(_bundle, "PromptTooLong", ())
log = logging.getLogger("ragtune.serve")


class ServeConfig(Config):
    """`serve` (conf/serve/default.yaml): the OpenAI-compatible server and web chat of `ragtune serve`."""

    host: str = Field("127.0.0.1", description="bind address: loopback only; 0.0.0.0 deliberately, with a token")
    port: int = Field(8000, ge=0, le=65535, description="port (0: any free port)")
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="generation in process, or by a managed `vllm serve` (the `vllm` group)")
    token_env: str | None = Field(
        "RAGTUNE_API_TOKEN", description="when this variable is set, /v1/* needs `Authorization: Bearer <its value>`")
    allowed_hosts: list[str] = Field(
        LOOPBACK_HOSTS, description="Host header names served, ports ignored (others: 421, against DNS rebinding); "
        "add this machine's names when binding 0.0.0.0; '*': any")
    max_body_bytes: int = Field(65536, ge=1024, description="larger request bodies get 413")
    max_question_chars: int = Field(2000, ge=1, description="longer questions get 400")
    max_concurrent: int = Field(2, ge=1, description="streaming generations at once")
    max_batch: int = Field(8, ge=1, description="plain requests arriving together share one batched generate call")
    batch_wait_ms: float = Field(10.0, ge=0, description="how long the first of them waits for company")
    max_waiting: int = Field(64, ge=1, description="requests waiting (or in a batch) beyond that get 429")
    max_tokens_cap: int = Field(1024, ge=1, description="upper bound on a request's max_tokens")
    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads for generation (null: torch's choice; 1 is faster when other jobs share the cores)")

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts_parse(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            if host != "*" and host_name(host) is None:
                raise ValueError(f"'{host}' is not a host name, an IPv4 address or a bracketed IPv6 address")
        return hosts


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered in OpenAI's shape with `status`."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.code, self.param)


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": shown(message, 500), "type": kind, "param": param, "code": code}}


def shown(text: str, limit: int = 80) -> str:
    """`text` safe to echo back: at most `limit` characters, anything that is not valid Unicode escaped."""
    text = text if len(text) <= limit else text[:limit] + "…"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def api_error_response(err: ApiError):
    from fastapi.responses import JSONResponse

    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


# --------------------------------------------------------------------------- request schema


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool = False


class ChatRequest(BaseModel):
    # Other OpenAI fields are accepted and ignored. Sampling settings are checked against OpenAI's
    # ranges, but decoding stays greedy.
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: StrictFloat | StrictInt | None = Field(default=None, ge=0, le=2)
    top_p: StrictFloat | StrictInt | None = Field(default=None, ge=0, le=1)
    n: StrictInt = Field(default=1, ge=1, le=1)
    top_k: StrictInt | None = Field(default=None, ge=1, le=20, description="passages to retrieve (ragtune extension)")


@dataclass(frozen=True)
class ParsedRequest:
    """What a valid chat request asks for."""

    question: str
    max_tokens: int | None  # the token budget, already capped at max_tokens_cap; None: the bundle's
    top_k: int | None
    stream: bool = False
    include_usage: bool = False


def parse_chat_request(body: bytes, headers: Mapping[str, str], settings: ServeConfig) -> ParsedRequest:
    """A chat completion request from its raw body and headers; every problem is an ApiError (4xx)."""
    check_content_type([v for k, v in headers.items() if k.lower() == "content-type"])
    check_content_encoding([v for k, v in headers.items() if k.lower() == "content-encoding"])
    if len(body) > settings.max_body_bytes:
        raise ApiError(413, f"request body over {settings.max_body_bytes} bytes", code="body_too_large")
    payload = parse_json(body)
    if (where := invalid_unicode_at(payload)) is not None:
        raise ApiError(400, f"{where}: text is not valid Unicode (a lone surrogate)", code="invalid_unicode",
                       param=where)
    try:
        req = ChatRequest.model_validate(payload)
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply", code="invalid_request") from None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(400, f"{where}: {first['msg']}", code="invalid_request", param=where) from None
    if (unsupported := unsupported_feature(payload)) is not None:
        raise ApiError(400, f"{unsupported} is not supported by this server (it answers in plain text)",
                       code="unsupported_parameter", param=unsupported)
    if req.model not in (None, "", MODEL_ID):
        raise ApiError(404, f"model '{shown(req.model)}' does not exist; this server has '{MODEL_ID}'",
                       code="model_not_found", param="model")
    users = [m for m in req.messages if m.role == "user"]
    if not users:
        raise ApiError(400, "messages: no user message to answer", code="no_question", param="messages")
    question = users[-1].text().strip()
    if not question:
        raise ApiError(400, "messages: the last user message is empty", code="no_question", param="messages")
    if len(question) > settings.max_question_chars:
        raise ApiError(400, f"question over {settings.max_question_chars} characters", code="question_too_long",
                       param="messages")
    asked = req.max_completion_tokens or req.max_tokens
    return ParsedRequest(
        question=question,
        max_tokens=min(asked, settings.max_tokens_cap) if asked else None,
        top_k=req.top_k,
        stream=req.stream,
        include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
    )


def unsupported_feature(payload: Mapping[str, Any]) -> str | None:
    """The first OpenAI feature the request asks for that this server cannot honour (tools, a JSON
    response format, log probabilities), or None: silently ignoring them would hand a client text it
    does not expect."""
    if payload.get("tools") or payload.get("functions"):
        return "tools" if payload.get("tools") else "functions"
    if payload.get("tool_choice") not in (None, "none", "auto"):
        return "tool_choice"
    response_format = payload.get("response_format")
    if response_format is not None and not (isinstance(response_format, Mapping) and response_format.get("type") == "text"):
        return "response_format"
    if payload.get("logprobs") or payload.get("top_logprobs"):
        return "logprobs"
    return None


def check_content_encoding(values: list[str]) -> None:
    """The body is sent as is (no Content-Encoding, or `identity`), else 415: a compressed body would
    otherwise be read as garbled JSON."""
    if any(v.strip().lower() not in ("", "identity") for v in values):
        raise ApiError(415, f"Content-Encoding '{shown(values[0], 40)}' is not supported: send the body uncompressed",
                       code="unsupported_media_type")


def check_content_type(values: list[str]) -> None:
    """One `Content-Type: application/json` (charset, if given, UTF-8), else 415."""
    problem = None
    if len(values) != 1:
        problem = "no Content-Type" if not values else "several Content-Type headers"
    else:
        media, *params = (part.strip() for part in values[0].split(";"))
        charsets = [v.strip().strip('"').lower() for k, _, v in (p.partition("=") for p in params)
                    if k.strip().lower() == "charset"]
        if media.lower() != "application/json":
            problem = f"Content-Type '{shown(media, 40)}'"
        elif any(c not in ("utf-8", "utf8") for c in charsets):
            problem = "a charset other than UTF-8"
    if problem:
        raise ApiError(415, f"{problem}: send the body as JSON with `Content-Type: application/json`",
                       code="unsupported_media_type")


def _no_constant(name: str) -> Any:
    raise ApiError(400, f"request body is not JSON: {name} is not a JSON number", code="invalid_json")


def parse_json(body: bytes) -> Any:
    """Strict JSON (RFC 8259): UTF-8 only, no NaN or Infinity; errors are 400s that echo nothing."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"request body is not UTF-8 (byte {err.start})", code="invalid_json") from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as err:  # its message is a position, never the input
        raise ApiError(400, f"request body is not JSON: {err}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply", code="invalid_json") from None
    except ValueError:  # an integer over Python's 4,300-digit conversion limit
        raise ApiError(400, "request body has a number with too many digits", code="invalid_json") from None


def invalid_unicode_at(payload: Any) -> str | None:
    """Where a string (key or value) of a parsed JSON document is not valid Unicode (JSON's `\\ud800`
    escapes give lone surrogates), as a dotted path; None when all are valid."""
    stack: list[tuple[Any, tuple | None]] = [(payload, None)]  # (value, (key, parent's path node))
    while stack:
        value, node = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if not _valid_unicode(key):
                    return _path((shown(key, 20), node))
                stack.append((item, (key, node)))
        elif isinstance(value, list):
            stack.extend((item, (str(i), node)) for i, item in enumerate(value))
        elif isinstance(value, str) and not _valid_unicode(value):
            return _path(node)
    return None


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _path(node: tuple | None) -> str:
    keys = []
    while node is not None:
        keys.append(node[0])
        node = node[1]
    return shown(".".join(reversed(keys)), 100) or "body"


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, 413 as soon as it is over `limit` bytes (declared or sent)."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and len(declared) < 20 and int(declared) > limit:
        raise ApiError(413, f"request body over {limit} bytes", code="body_too_large")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise ApiError(413, f"request body over {limit} bytes", code="body_too_large")
    return bytes(body)


# --------------------------------------------------------------------------- Host and token


_NAME = re.compile(r"[a-z0-9]([a-z0-9_-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9_-]*[a-z0-9])?)*\.?")


def host_name(value: str) -> str | None:
    """The name part of a Host header value (`name`, `name:port`, `[v6]:port`), lower case; None when
    malformed. A bare IPv6 address (`::1`, in configuration) comes back bracketed."""
    value = value.strip().lower()
    if value.startswith("["):
        name, sep, port = value.partition("]")
        name += "]"
        if not sep or (port and not port.startswith(":")):
            return None
        port = port[1:]
        try:
            name = f"[{ipaddress.IPv6Address(name[1:-1])}]"
        except ValueError:
            return None
    elif value.count(":") > 1:  # unbracketed IPv6: configuration only (a port would be ambiguous)
        try:
            return f"[{ipaddress.IPv6Address(value)}]"
        except ValueError:
            return None
    else:
        name, _, port = value.partition(":")
        if not _NAME.fullmatch(name) or len(name) > 253:
            return None
    if port and not (port.isascii() and port.isdigit() and len(port) <= 5):
        return None
    return name


def allowed_host_names(settings: ServeConfig) -> set[str] | None:
    """The Host names served: `allowed_hosts`, plus the bind address when it is one address (not
    0.0.0.0 or ::); None when '*' allows any."""
    if "*" in settings.allowed_hosts:
        return None
    names = {host_name(h) for h in settings.allowed_hosts}
    bound = host_name(settings.host) if settings.host else None
    if bound and bound not in ("0.0.0.0", "[::]"):
        names.add(bound)
    return {n for n in names if n}


def check_host(values: list[str], allowed: set[str] | None) -> None:
    if allowed is None:
        return
    if len(values) != 1:
        raise ApiError(400, "a request needs exactly one Host header", code="bad_host")
    name = host_name(values[0])
    if name is None:
        raise ApiError(400, "malformed Host header", code="bad_host")
    if name not in allowed:
        raise ApiError(421, f"this server does not answer for host '{shown(name, 60)}' "
                            "(add it to serve.allowed_hosts, or pass --allow-host)", code="host_not_allowed")


def configured_token(settings: ServeConfig) -> str | None:
    """The bearer token, read from `token_env` at each call; None when unset or blank."""
    token = os.environ.get(settings.token_env) if settings.token_env else None
    return token if token and token.strip() else None


def check_token(authorization: str | None, token: str | None) -> None:
    if token is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if not (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())):
        raise ApiError(401, "missing or wrong bearer token", "authentication_error", "invalid_api_key",
                       {"WWW-Authenticate": "Bearer"})


def needs_token(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/") or path == "/openapi.json"


class Guard:
    """ASGI middleware run before routing: a size limit on the headers, the Host allow-list for every
    request, then the bearer token for every /v1/... path (and /openapi.json), whatever the path or
    method, so that 404 and 405 come only after authentication."""

    def __init__(self, app: Any, settings: ServeConfig):
        self.app, self.settings, self.allowed = app, settings, allowed_host_names(settings)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            try:
                if sum(len(k) + len(v) + 4 for k, v in scope["headers"]) > MAX_HEADER_BYTES:
                    raise ApiError(431, f"request headers over {MAX_HEADER_BYTES} bytes", code="headers_too_large")
                check_host(headers.getlist("host"), self.allowed)
                if needs_token(scope["path"]):
                    check_token(headers.get("authorization"), configured_token(self.settings))
            except ApiError as err:
                await api_error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(settings: ServeConfig) -> str | None:
    """A warning when the server listens beyond loopback with no token; None otherwise."""
    if is_loopback(settings.host) or configured_token(settings):
        return None
    return (f"this server listens on {settings.host or 'every address'} without a bearer token: "
            "anyone who can reach it can use it")


def check_exposure(settings: ServeConfig, insecure_no_token: bool = False) -> str | None:
    """Refuse (ConfigError) to listen beyond loopback without a token, unless `insecure_no_token`;
    then returns the warning to show."""
    warning = exposure_warning(settings)
    if warning and not insecure_no_token:
        how = f"set ${settings.token_env}" if settings.token_env else "set serve.token_env and that variable"
        raise ConfigError(f"refusing to serve on {settings.host or 'every address'} without a bearer token: {how}, "
                          "bind 127.0.0.1, or pass --insecure-no-token to let anyone who can reach it use it")
    return warning


# --------------------------------------------------------------------------- admission and batching


class Admission:
    """At most `max_waiting` requests wait (or, for plain ones, sit in a batch); beyond that a 429 with
    Retry-After. Streams each hold one of `max_concurrent` slots while they generate."""

    def __init__(self, max_concurrent: int, max_waiting: int):
        self.slots = asyncio.Semaphore(max(1, max_concurrent))
        self.max_waiting, self.waiting = max_waiting, 0

    @contextlib.asynccontextmanager
    async def queued(self):
        """Count the request as waiting for the length of the block; 429 when `max_waiting` already are."""
        if self.waiting >= self.max_waiting:
            raise ApiError(429, "too many requests waiting; retry shortly", "rate_limit_error", "busy",
                           {"Retry-After": str(RETRY_AFTER_S)})
        self.waiting += 1
        try:
            yield
        finally:
            self.waiting -= 1

    async def acquire_slot(self) -> None:
        """Wait (counted as waiting) for a generation slot; give it back with `release_slot`."""
        async with self.queued():
            await self.slots.acquire()

    def release_slot(self) -> None:
        self.slots.release()


class Batcher:
    """Answers concurrent plain requests together: waiting questions (up to `max_batch`, gathered
    for at most `wait_s`) go to the generator as one batch per (top_k, token budget). When a batched
    call raises, each of its questions is answered alone, so only a failing one gets the error."""

    def __init__(self, bundle: Bundle, max_batch: int, wait_s: float):
        self.bundle, self.max_batch, self.wait_s = bundle, max(1, max_batch), wait_s
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None

    def pending(self) -> int:
        return self.queue.qsize() if self.queue else 0

    async def answer(self, question: str, top_k: int | None, budget: int | None) -> dict[str, Any]:
        if self.worker is None or self.worker.done():
            self.queue = self.queue or asyncio.Queue()
            self.worker = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((question, top_k, budget, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while len(items) < self.max_batch and (left := deadline - loop.time()) > 0:
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            groups: dict[tuple, list] = {}
            for item in items:
                groups.setdefault((item[1], item[2]), []).append(item)
            for (top_k, budget), group in groups.items():
                await self._answer_group(group, top_k, budget)

    async def _answer_group(self, group: list, top_k: int | None, budget: int | None) -> None:
        from starlette.concurrency import run_in_threadpool

        try:
            results = await run_in_threadpool(self.bundle.answer_many, [g[0] for g in group], top_k, budget)
            if len(results) != len(group):
                raise RuntimeError(f"answer_many returned {len(results)} answers for {len(group)} questions")
        except Exception as err:  # noqa: BLE001 - whatever failed, each request learns its own fate
            if len(group) == 1:
                _settle(group[0][3], error=err)
                return
            log.warning("a batch of %d failed (%s); answering its requests one by one", len(group), type(err).__name__)
            for item in group:
                await self._answer_group([item], top_k, budget)
            return
        for item, result in zip(group, results):
            _settle(item[3], result)


def _settle(future: asyncio.Future, result: Any = None, error: Exception | None = None) -> None:
    if future.done():  # its request was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


# --------------------------------------------------------------------------- responses


def usage_object(counts: dict[str, Any]) -> dict[str, int]:
    """OpenAI's usage object from token counts (a bundle result's `usage` or a stream's stats)."""
    prompt, completion = int(counts.get("prompt_tokens", 0)), int(counts.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


NOTES = ("route_note", "context_note")


def extras(result_or_prepared: Any) -> dict[str, Any]:
    """The `ragtune` object of a response: route, sources, final answer, notes (a failed router,
    passages left out to fit the context)."""
    if isinstance(result_or_prepared, dict):
        keys = ("route", "sources", "final_answer", *NOTES)
        return {k: result_or_prepared[k] for k in keys if k in result_or_prepared}
    p = result_or_prepared
    return {"route": p.route, "sources": p.sources} | {k: getattr(p, k) for k in NOTES if getattr(p, k, None)}


def completion_body(result: dict[str, Any], completion_id: str, created: int) -> dict[str, Any]:
    counts = result.get("usage") or {}
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": MODEL_ID,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                     "finish_reason": counts.get("finish_reason", "stop")}],
        "usage": usage_object(counts),
        "ragtune": extras(result),
    }


def answering_failed(err: Exception) -> ApiError:
    """The error a request gets when answering it raised: a 400 when its prompt cannot fit the model's
    context, else a 500 (logged here, with its message; the client learns only the exception's kind)."""
    if isinstance(err, PROMPT_TOO_LONG):
        return ApiError(400, str(err), code="context_length_exceeded", param="messages")
    log.error("answering a request failed: %s: %s", type(err).__name__, shown(str(err), 300))
    return ApiError(500, f"the server failed to answer this request ({type(err).__name__})", "server_error",
                    "generation_failed")


class SlotStream(StreamingResponse):
    """A streamed answer that gives its generation slot back when the response ends, however it ends
    (even when the client leaves before the first event, and the body is never iterated)."""

    def __init__(self, events: AsyncIterator[str], release: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


async def stream_events(bundle: Bundle, prepared: Any, req: ParsedRequest, completion_id: str,
                        created: int) -> AsyncIterator[str]:
    """A prepared question's streamed answer as server-sent events; a client hanging up stops the
    generation at its next token."""
    from starlette.concurrency import iterate_in_threadpool

    def event(body: dict[str, Any]) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def chunk(delta: dict[str, Any], finish: str | None = None, extra: dict[str, Any] | None = None) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": MODEL_ID,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return event(body | ({"ragtune": extra} if extra is not None else {}))

    cancel = threading.Event()
    try:
        yield chunk({"role": "assistant", "content": ""}, extra=extras(prepared))
        pieces: list[str] = []
        stats: dict[str, Any] = {}
        async for piece in iterate_in_threadpool(bundle.stream(prepared, cancel, stats)):
            pieces.append(piece)
            yield chunk({"content": piece})
        result = bundle.finish(prepared, "".join(pieces).strip())
        yield chunk({}, stats.get("finish_reason", "stop"), extras(result))
        if req.include_usage:
            yield event({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                         "model": MODEL_ID, "choices": [], "usage": usage_object(stats)})
        yield "data: [DONE]\n\n"
    except Exception as err:  # noqa: BLE001 - headers are sent: report in-band, as OpenAI's streams do
        yield event(answering_failed(err).body())
    finally:
        cancel.set()


# --------------------------------------------------------------------------- the app


def add_error_handlers(app: Any) -> None:
    """Every error the app answers in OpenAI's shape: ours, the router's (unknown path, wrong method)
    and an unexpected exception (a bug: a 500, its traceback logged by Starlette)."""
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(ApiError)
    async def api_error(_request, err: ApiError):
        return api_error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = f"{request.method} {shown(request.scope['path'])}: {err.detail}"
        return JSONResponse(error_body(message, code=codes.get(err.status_code)), status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(_request, _err: Exception):
        return JSONResponse(error_body("internal server error", "server_error", "internal_error"), status_code=500)


def create_app(bundle: Bundle, settings: ServeConfig | None = None):
    """The app: the guards, the routes, and plain or streamed answers through admission and the batcher."""
    from fastapi import FastAPI
    from fastapi.responses import FileResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect

    settings = settings or ServeConfig()
    app = FastAPI(title="ragtune", docs_url=None, redoc_url=None)
    app.add_middleware(Guard, settings=settings)
    admission = Admission(settings.max_concurrent, settings.max_waiting)
    batcher = Batcher(bundle, settings.max_batch, settings.batch_wait_ms / 1000)
    model_card = {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "ragtune"}

    add_error_handlers(app)

    def get_and_head(path: str, **kwargs: Any) -> Callable:
        def register(endpoint: Callable) -> Callable:
            app.add_api_route(path, endpoint, methods=["GET"], **kwargs)
            app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)
            return endpoint
        return register

    @get_and_head("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @get_and_head("/healthz")
    async def healthz():
        health = {"status": "ok", "model": MODEL_ID, "bundle_digest": bundle.manifest.get("digest", ""),
                  "token_required": configured_token(settings) is not None}
        return health | ({"warning": warning} if (warning := exposure_warning(settings)) else {})

    @get_and_head("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card]}

    @get_and_head("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id != MODEL_ID:
            raise ApiError(404, f"model '{shown(model_id)}' does not exist; this server has '{MODEL_ID}'",
                           code="model_not_found")
        return model_card

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await read_body(request, settings.max_body_bytes)
        except ClientDisconnect:
            log.info("%s hung up before sending the whole request body", _client(request))
            return Response(status_code=400)  # nobody is left to read it
        req = parse_chat_request(body, request.headers, settings)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if not req.stream:
            async with admission.queued():
                try:
                    result = await batcher.answer(req.question, req.top_k, req.max_tokens)
                except Exception as err:  # noqa: BLE001 - a 400 or an OpenAI-shaped 500, never plain text
                    raise answering_failed(err) from None
            return completion_body(result, completion_id, created)
        # Slot and prompt before the 200: a full server is a 429 and a prompt too long a 400, not a broken stream.
        await admission.acquire_slot()
        try:
            prepared = await run_in_threadpool(bundle.prepare, req.question, req.top_k, req.max_tokens)
        except Exception as err:  # noqa: BLE001 - as above
            admission.release_slot()
            raise answering_failed(err) from None
        except BaseException:  # cancelled
            admission.release_slot()
            raise
        return SlotStream(stream_events(bundle, prepared, req, completion_id, created), admission.release_slot)

    app.state.settings, app.state.bundle = settings, bundle
    return app


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "a client"


# --------------------------------------------------------------------------- running


def h11_protocol() -> type:
    """uvicorn's h11 protocol with its own 400s (a request h11 cannot parse, reaching no app) in
    OpenAI's JSON error shape instead of plain text."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class OpenAIErrorsH11Protocol(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            body = json.dumps(error_body(f"malformed HTTP request: {msg}", code="bad_http_request")).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            try:
                for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                              h11.Data(data=body), h11.EndOfMessage()):
                    self.transport.write(self.conn.send(event))
            except h11.LocalProtocolError:  # a response had already begun: nothing more can be said
                pass
            self.transport.close()

        def _unsupported_upgrade_warning(self) -> None:  # no WebSocket here: such requests are plain HTTP
            self.logger.debug("Upgrade header ignored")

    return OpenAIErrorsH11Protocol


def uvicorn_config(app: Any, host: str, port: int, log_level: str = "info", **kwargs: Any):
    """The uvicorn settings `ragtune serve` runs with: h11 with JSON 400s, no WebSocket upgrades (an
    Upgrade header is ignored), no Server header."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=h11_protocol(), ws="none",
                          server_header=False, **kwargs)


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread; yields its base URL (port 0: any free port)."""
    import uvicorn

    server = uvicorn.Server(uvicorn_config(app, host, port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not (server.started and server.servers):
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    bound = server.servers[0].sockets[0].getsockname()
    try:
        yield f"http://{f'[{bound[0]}]' if ':' in bound[0] else bound[0]}:{bound[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
