"""A real OpenAI-compatible teacher on 127.0.0.1 for tests and benchmarks.

`LoopbackTeacher(respond)` serves POST /v1/chat/completions on an ephemeral port from a thread.
`respond(request, call_no)` returns what to do for the n-th call (0-based) carrying the same user
message: `Answer(...)`, `Status(429, retry_after=...)`, `Malformed()`, `Hang(seconds)`. The server
records every call (user message, start/end time, action) and the peak number in flight.
`unused_base_url()` is the opposite: a loopback URL where nothing listens.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Answer:
    content: str
    reasoning: str | None = None
    latency: float = 0.0


@dataclass(frozen=True)
class Status:
    code: int
    retry_after: float | str | None = None  # a string is sent as is (e.g. "inf")
    latency: float = 0.0


@dataclass(frozen=True)
class Malformed:
    body: bytes = b'{"choices": [{"message": '  # cut short: not JSON
    latency: float = 0.0


@dataclass(frozen=True)
class Hang:
    """Answer nothing for `seconds` (longer than the client's timeout); ends early when the client hangs up."""

    seconds: float = 5.0


Action = Answer | Status | Malformed | Hang


def user_text(request: dict[str, Any]) -> str:
    return next((m.get("content", "") for m in reversed(request.get("messages", [])) if m.get("role") == "user"), "")


class LoopbackTeacher:
    def __init__(self, respond: Callable[[dict[str, Any], int], Action], model: str = "loopback"):
        self.respond, self.model = respond, model
        self.lock = threading.Lock()
        self.calls: list[dict[str, Any]] = []  # {user, start, end, action}
        self.calls_per_user: Counter = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def calls_by_user(self) -> dict[str, int]:
        with self.lock:
            return dict(self.calls_per_user)

    def __enter__(self) -> LoopbackTeacher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------ the handler
    def _handler_class(self):
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
            disable_nagle_algorithm = True  # headers and body go out separately: no 40 ms delayed-ACK stall

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, b'{"error": {"message": "not found"}}')
                    return
                request = json.loads(raw)
                user = user_text(request)
                with teacher.lock:
                    call_no = teacher.calls_per_user[user]
                    teacher.calls_per_user[user] += 1
                    teacher.in_flight += 1
                    teacher.max_in_flight = max(teacher.max_in_flight, teacher.in_flight)
                    record = {"user": user, "start": time.monotonic(), "call_no": call_no}
                    teacher.calls.append(record)
                action = teacher.respond(request, call_no)
                record["action"] = type(action).__name__
                if isinstance(action, Hang):
                    self._hang(action.seconds)
                    self._done(record)
                    self.close_connection = True
                    return
                if action.latency:
                    time.sleep(action.latency)
                self._done(record)  # before the reply leaves, so a freed client slot is never double counted
                if isinstance(action, Answer):
                    self._send(200, json.dumps(teacher._completion(request, action)).encode())
                elif isinstance(action, Status):
                    value = action.retry_after
                    headers = {} if value is None else {"Retry-After": value if isinstance(value, str) else f"{value:g}"}
                    body = json.dumps({"error": {"message": f"scripted {action.code}", "type": "scripted"}})
                    self._send(action.code, body.encode(), headers)
                else:
                    self._send(200, action.body)

            def _hang(self, seconds: float) -> None:
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    readable, _, _ = select.select([self.connection], [], [], 0.005)
                    if readable:
                        try:
                            if self.connection.recv(1, socket.MSG_PEEK) == b"":
                                return  # the client gave up and closed the connection
                        except OSError:
                            return

            def _done(self, record: dict[str, Any]) -> None:
                with teacher.lock:
                    teacher.in_flight -= 1
                    record["end"] = time.monotonic()

            def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    self.close_connection = True

        return Handler

    def _completion(self, request: dict[str, Any], answer: Answer) -> dict[str, Any]:
        message = {"role": "assistant", "content": answer.content}
        if answer.reasoning is not None:
            message["reasoning_content"] = answer.reasoning
        return {
            "id": f"chatcmpl-{len(self.calls)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", self.model),
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30},
        }


def unused_base_url() -> str:
    """An OpenAI-style base URL on loopback where nothing listens: every call is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def by_question(script: dict[str, list[Action]]) -> Callable[[dict[str, Any], int], Action]:
    """A responder playing, per user message, its list of actions for successive calls (the last repeats)."""

    def respond(request: dict[str, Any], call_no: int) -> Action:
        actions = script[user_text(request)]
        return actions[min(call_no, len(actions) - 1)]

    return respond
