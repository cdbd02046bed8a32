"""Generation backends: batched greedy == one by one; the OpenAI backend against a loopback server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ragtune.inference import OpenAIGenerator, TransformersGenerator, cut_loop, repeating_period

PROMPTS = ["What is 2+2?", "请用一句话介绍北京。", "Name a colour.", "Say hi"]


@pytest.fixture(scope="module")
def generator(base_generator):
    return TransformersGenerator(base_generator, batch_size=4)


def test_batched_generation_equals_one_by_one(generator):
    # prompts of different lengths, so the batch really is left-padded
    batched = generator.generate(PROMPTS, max_new_tokens=10)
    single = [generator.generate([p], max_new_tokens=10)[0] for p in PROMPTS]
    assert batched == single
    assert all(isinstance(a, str) and a == a.strip() for a in batched)
    assert "<|im_end|>" not in "".join(batched)  # special tokens stripped
    assert not any(a.endswith("\ufffd") for a in batched)  # no half character at the cut


@pytest.mark.parametrize(("prompt", "budget"), [(PROMPTS[0], 10), ("2+2?", 3), ("2+2?", 6), ("25乘4是多少？", 5), (PROMPTS[1], 7)])
def test_stream_adds_up_to_exactly_what_generate_returns(generator, prompt, budget):
    # budgets that end on whitespace or inside a character: nothing ragged may leak into the stream
    assert "".join(generator.stream(prompt, max_new_tokens=budget)) == generator.generate([prompt], max_new_tokens=budget)[0]


def test_detailed_generation_counts_tokens_and_says_why_it_stopped(generator):
    cut = generator.generate_detailed(PROMPTS, max_new_tokens=3)
    assert [c.finish_reason for c in cut] == ["length"] * len(PROMPTS)
    assert all(c.completion_tokens == 3 and c.prompt_tokens > 10 for c in cut)
    room = generator.generate_detailed(["Say hi"], max_new_tokens=200)[0]
    assert room.finish_reason == "stop" and room.completion_tokens < 200  # it ended with <|im_end|>
    stats: dict = {}
    "".join(generator.stream("Say hi", max_new_tokens=200, stats=stats))
    assert stats == {"prompt_tokens": room.prompt_tokens, "completion_tokens": room.completion_tokens, "finish_reason": "stop",
                     "repetition_stopped": False}


def test_a_cancelled_stream_stops_at_the_next_token(generator):
    cancel = threading.Event()
    stats: dict = {}
    pieces = generator.stream("Count from 1 to 500.", max_new_tokens=400, cancel=cancel, stats=stats)
    next(pieces)
    cancel.set()
    list(pieces)
    assert stats["completion_tokens"] < 50


def test_missing_adapter_is_a_clear_error(base_generator, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        TransformersGenerator(base_generator, adapter_dir=tmp_path)


class _ChatHandler(BaseHTTPRequestHandler):
    """A tiny /v1/chat/completions: answers with the user text upper-cased, records each request."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
        user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
        payload = {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": f" {user.upper()} "}}
            ],
        }
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def chat_server():
    _ChatHandler.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChatHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_backend_keeps_order_and_decodes_greedily(chat_server, monkeypatch):
    monkeypatch.setenv("RAGTUNE_TEST_KEY", "sk-test")
    gen = OpenAIGenerator(chat_server, "m", api_key_env="RAGTUNE_TEST_KEY", max_concurrency=3, system="be brief",
                          timeout=30)
    assert isinstance(gen, OpenAIGenerator)
    texts = [f"question {i}" for i in range(7)]
    assert gen.generate(texts, max_new_tokens=5) == [t.upper() for t in texts]
    reqs = _ChatHandler.requests
    assert len(reqs) == 7
    assert all(r["path"] == "/v1/chat/completions" and r["temperature"] == 0 for r in reqs)
    assert all(r["max_tokens"] == 5 and r["auth"] == "Bearer sk-test" for r in reqs)
    assert reqs[0]["messages"][0] == {"role": "system", "content": "be brief"}


def test_openai_backend_requires_the_named_key(monkeypatch):
    monkeypatch.delenv("RAGTUNE_MISSING_KEY", raising=False)
    with pytest.raises(RuntimeError, match="RAGTUNE_MISSING_KEY"):
        OpenAIGenerator("http://127.0.0.1:9/v1", "m", api_key_env="RAGTUNE_MISSING_KEY")


def test_repetition_guard_finds_loops_and_keeps_one_copy():
    assert repeating_period([7] * 48, 48) == 1
    assert repeating_period([1, 2, 3] * 16, 48) == 3
    assert repeating_period(list(range(48)), 48) is None
    assert repeating_period([5] * 47, 48) is None  # not enough tokens yet
    assert repeating_period([4, 4, 4, 0] * 12, 0) is None  # window 0: off
    tokens, looped = cut_loop([9, 8] + [1, 2, 3] * 20, 48)
    assert looped and tokens == [9, 8, 1, 2, 3]
    assert cut_loop([1, 2, 3, 4], 48) == ([1, 2, 3, 4], False)


def test_repetition_guard_stops_a_looping_generation(base_generator, monkeypatch):
    """A model forced into a loop (every step the same three tokens): with the guard it stops long before its
    budget and keeps one copy of the loop; without it, it runs to the budget."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    loop = [28, 29, 30]

    class Loop(LogitsProcessor):
        def __call__(self, input_ids, scores):
            forced = torch.full_like(scores, -1e9)
            forced[:, loop[input_ids.shape[1] % 3]] = 0
            return forced

    gen = TransformersGenerator(base_generator, batch_size=2)
    kwargs = gen._generation_kwargs
    monkeypatch.setattr(gen, "_generation_kwargs", lambda n: kwargs(n) | {"logits_processor": LogitsProcessorList([Loop()])})

    def run(window):
        gen.repeat_window = window
        return gen.generate_detailed(["count", "sing a song"], max_new_tokens=48)

    guarded, unguarded = run(12), run(0)
    for c in guarded:
        assert c.repetition_stopped and c.finish_reason == "stop" and c.completion_tokens < 20
        assert len(c.text) < 10
    assert all(c.completion_tokens == 48 and c.finish_reason == "length" for c in unguarded)
