"""`ragtune serve`: a bundle behind an OpenAI-compatible API and a web chat page.

    GET  /                      the web chat (route, retrieved passages, answer)
    GET  /healthz               liveness and the bundle's digest
    GET  /v1/models             the one model, "ragtune"
    POST /v1/chat/completions   OpenAI chat completions, plain or streaming (SSE); the last user
                                message is the question. Responses carry an extra `ragtune` object
                                (route, sources, final_answer) that OpenAI clients ignore.

Guards: binds 127.0.0.1 unless told otherwise; a bearer token when the environment variable named by
`token_env` is set; request bodies and questions have size limits; concurrent plain requests are
answered together, up to `max_batch` per batched generate call, streams hold one of
`max_concurrent` slots, and at most `max_waiting` requests wait (beyond that: 429); every bad
request gets a 4xx in OpenAI's error shape and the server keeps serving.

`backend: vllm` starts `vllm serve <base> --enable-lora --lora-modules ragtune=<adapter>`
(ragtune.engine) and sends generation to it through the same OpenAI client the eval stage uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from fastapi import Request  # module level: the endpoints' annotations must resolve here
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError

from ragtune.bundle import Bundle
from ragtune.config import Config
from ragtune.engine import MODEL_ID
STATIC = Path(__file__).parent / "static"


class ServeConfig(Config):
    """`serve` (conf/serve/default.yaml): the OpenAI-compatible server and web chat of `ragtune serve`."""

    host: str = Field("127.0.0.1", description="bind address: loopback only; 0.0.0.0 deliberately, with a token")
    port: int = Field(8000, ge=0, le=65535, description="port (0: any free port)")
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="generation in process, or by a managed `vllm serve` (the `vllm` group)")
    token_env: str | None = Field(
        "RAGTUNE_API_TOKEN", description="when this variable is set, /v1/* needs `Authorization: Bearer <its value>`")
    max_body_bytes: int = Field(65536, ge=1024, description="larger request bodies get 413")
    max_question_chars: int = Field(2000, ge=1, description="longer questions get 400")
    max_concurrent: int = Field(2, ge=1, description="streaming generations at once")
    max_batch: int = Field(8, ge=1, description="plain requests arriving together share one batched generate call")
    batch_wait_ms: float = Field(10.0, ge=0, description="how long the first of them waits for company")
    max_waiting: int = Field(64, ge=1, description="requests queued beyond that get 429")
    max_tokens_cap: int = Field(1024, ge=1, description="upper bound on a request's max_tokens")
    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads for generation (null: torch's choice; 1 is faster when other jobs share the cores)")


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


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers


# --------------------------------------------------------------------------- the app


def usage_object(counts: dict[str, Any]) -> dict[str, int]:
    """OpenAI's usage object from token counts (a bundle result's `usage` or a stream's stats)."""
    prompt, completion = int(counts.get("prompt_tokens", 0)), int(counts.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Batcher:
    """Answers concurrent plain requests together: waiting questions (up to `max_batch`, gathered
    for at most `wait_s`) go to the generator as one batch per (top_k, token budget)."""

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
        from starlette.concurrency import run_in_threadpool

        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while len(items) < self.max_batch and (left := deadline - loop.time()) > 0:
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            groups: dict[tuple, list] = {}
            for item in items:
                groups.setdefault((item[1], item[2]), []).append(item)
            for (top_k, budget), group in groups.items():
                try:
                    results = await run_in_threadpool(self.bundle.answer_many, [g[0] for g in group], top_k, budget)
                except Exception as err:  # every waiting request learns of it; the worker goes on
                    for g in group:
                        if not g[3].done():
                            g[3].set_exception(err)
                    continue
                for g, result in zip(group, results, strict=True):
                    if not g[3].done():
                        g[3].set_result(result)



def create_app(bundle: Bundle, settings: ServeConfig | None = None):
    from fastapi import FastAPI
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

    settings = settings or ServeConfig()
    app = FastAPI(title="ragtune", docs_url=None, redoc_url=None)
    slots = asyncio.Semaphore(max(1, settings.max_concurrent))
    batcher = Batcher(bundle, settings.max_batch, settings.batch_wait_ms / 1000)
    queue = {"waiting": 0}
    digest = bundle.manifest.get("digest", "")

    @app.exception_handler(ApiError)
    async def api_error(_request, err: ApiError):
        body = {"error": {"message": err.message, "type": err.kind, "code": err.code}}
        return JSONResponse(body, status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):  # unknown path, wrong method
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = f"{request.method} {request.url.path}: {err.detail}"
        body = {"error": {"message": message, "type": "invalid_request_error", "code": codes.get(err.status_code)}}
        return JSONResponse(body, status_code=err.status_code, headers=getattr(err, "headers", None))

    def authorize(request: Request) -> None:
        token = os.environ.get(settings.token_env or "") if settings.token_env else None
        if not token:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())):
            raise ApiError(401, "missing or wrong bearer token", "authentication_error", "invalid_api_key",
                           {"WWW-Authenticate": "Bearer"})

    async def read_request(request: Request) -> ChatRequest:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise ApiError(413, f"request body over {settings.max_body_bytes} bytes", code="body_too_large")
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > settings.max_body_bytes:
                raise ApiError(413, f"request body over {settings.max_body_bytes} bytes", code="body_too_large")
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"request body is not JSON: {err}", code="invalid_json") from None
        except RecursionError:
            raise ApiError(400, "request body is nested too deeply", code="invalid_json") from None
        try:
            return ChatRequest.model_validate(payload)
        except RecursionError:
            raise ApiError(400, "request body is nested too deeply", code="invalid_request") from None
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise ApiError(400, f"{where}: {first['msg']}", code="invalid_request") from None

    def question_of(req: ChatRequest) -> str:
        if req.model not in (None, "", MODEL_ID):
            raise ApiError(404, f"model '{req.model}' does not exist; this server has '{MODEL_ID}'", code="model_not_found")
        users = [m for m in req.messages if m.role == "user"]
        if not users:
            raise ApiError(400, "messages: no user message to answer", code="no_question")
        question = users[-1].text().strip()
        if not question:
            raise ApiError(400, "messages: the last user message is empty", code="no_question")
        if len(question) > settings.max_question_chars:
            raise ApiError(400, f"question over {settings.max_question_chars} characters", code="question_too_long")
        return question

    def token_budget(req: ChatRequest) -> int | None:
        asked = req.max_completion_tokens or req.max_tokens
        return min(asked, settings.max_tokens_cap) if asked else None

    @contextlib.asynccontextmanager
    async def generation_slot():
        if queue["waiting"] >= settings.max_waiting:
            raise ApiError(429, "too many requests waiting; retry shortly", "rate_limit_error", "busy", {"Retry-After": "2"})
        queue["waiting"] += 1
        try:
            await slots.acquire()
        finally:
            queue["waiting"] -= 1
        try:
            yield
        finally:
            slots.release()

    def extras(result_or_prepared: Any) -> dict[str, Any]:
        if isinstance(result_or_prepared, dict):
            keys = ("route", "sources", "final_answer", "route_note")
            return {k: result_or_prepared[k] for k in keys if k in result_or_prepared}
        p = result_or_prepared
        return {"route": p.route, "sources": p.sources} | ({"route_note": p.route_note} if p.route_note else {})

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz():
        return {"status": "ok", "model": MODEL_ID, "bundle_digest": digest}

    model_card = {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "ragtune"}

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str, request: Request):
        authorize(request)
        if model_id != MODEL_ID:
            raise ApiError(404, f"model '{model_id}' does not exist; this server has '{MODEL_ID}'", code="model_not_found")
        return model_card

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        req = await read_request(request)
        question = question_of(req)
        budget = token_budget(req)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        if not req.stream:
            if batcher.pending() >= settings.max_waiting:
                raise ApiError(429, "too many requests waiting; retry shortly", "rate_limit_error", "busy",
                               {"Retry-After": "2"})
            result = await batcher.answer(question, req.top_k, budget)
            counts = result.get("usage") or {}
            return {
                "id": completion_id, "object": "chat.completion", "created": created, "model": MODEL_ID,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                             "finish_reason": counts.get("finish_reason", "stop")}],
                "usage": usage_object(counts),
                "ragtune": extras(result),
            }

        def chunk(delta: dict[str, Any], finish: str | None = None, extra: dict[str, Any] | None = None) -> str:
            body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": MODEL_ID,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if extra is not None:
                body["ragtune"] = extra
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        # Take the slot before answering 200, so that a full queue is a 429, not a broken stream.
        slot = generation_slot()
        await slot.__aenter__()

        cancel = threading.Event()  # set when the client goes away: generation stops at the next token

        async def events():
            try:
                prepared = await run_in_threadpool(bundle.prepare, question, req.top_k, budget)
                yield chunk({"role": "assistant", "content": ""}, extra=extras(prepared))
                pieces: list[str] = []
                stats: dict[str, Any] = {}
                async for piece in iterate_in_threadpool(bundle.stream(prepared, cancel, stats)):
                    pieces.append(piece)
                    yield chunk({"content": piece})
                result = bundle.finish(prepared, "".join(pieces).strip())
                yield chunk({}, stats.get("finish_reason", "stop"), extras(result))
                if req.stream_options and req.stream_options.include_usage:
                    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                            "model": MODEL_ID, "choices": [], "usage": usage_object(stats)}
                    yield f"data: {json.dumps(body)}\n\n"
                yield "data: [DONE]\n\n"
            except Exception as err:  # headers are sent: report in-band, as OpenAI's streams do
                yield f"data: {json.dumps({'error': {'message': str(err), 'type': 'server_error'}})}\n\n"
            finally:
                cancel.set()
                await slot.__aexit__(None, None, None)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    app.state.settings = settings
    app.state.bundle = bundle
    return app


# --------------------------------------------------------------------------- running


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread; yields its base URL (port 0: any free port)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not (server.started and server.servers):
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    bound = server.servers[0].sockets[0].getsockname()
    try:
        yield f"http://{bound[0]}:{bound[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
