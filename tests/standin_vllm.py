"""A stand-in for the `vllm` executable: the same command line and the same OpenAI API on loopback,
for testing ragtune.engine's lifecycle on a machine without a GPU.

    vllm serve <model> --host H --port P --served-model-name N
         [--enable-lora --lora-modules name=path --max-lora-rank R] [other flags, ignored]

GET /v1/models lists N (and the LoRA module), POST /v1/chat/completions answers (streamed or not)
with the real model (ragtune.inference.TransformersGenerator: base, or base + the adapter for the
LoRA module's name), or echoes the last user message when RAGTUNE_STANDIN_ECHO=1.
GET /standin/stats: requests served, peak requests in flight, pid of the worker child.

(No `from __future__ import annotations` here: FastAPI must see the endpoints' real annotations.)

Misbehaviour on demand (environment):
  RAGTUNE_STANDIN_DIE_ON_START=<code>  exit with that code before serving (after a line of output)
  RAGTUNE_STANDIN_START_DELAY=<s>      sleep before serving (a slow or hung start)
  RAGTUNE_STANDIN_DIE_AFTER=<n>        exit (code 7) when request n+1 arrives, without answering it
  RAGTUNE_STANDIN_DELAY=<s>            each chat request takes at least this long (to see concurrency)
  RAGTUNE_STANDIN_CHILD=1              start a worker child in the same process group, as vLLM does
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import uuid

ENV = os.environ.get


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vllm")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("model")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", dest="served_model_name")
    serve.add_argument("--enable-lora", action="store_true")
    serve.add_argument("--lora-modules", nargs="*", default=[])
    serve.add_argument("--max-lora-rank", type=int, default=16)
    args, unknown = parser.parse_known_args(argv)
    args.unknown = unknown
    if args.lora_modules and not args.enable_lora:
        parser.error("--lora-modules needs --enable-lora")
    args.loras = dict(item.split("=", 1) for item in args.lora_modules)
    for name, path in args.loras.items():  # like vLLM: an adapter above --max-lora-rank is refused
        with open(os.path.join(path, "adapter_config.json")) as fh:
            rank = json.load(fh)["r"]
        if rank > args.max_lora_rank:
            parser.error(f"LoRA {name} has rank {rank} > --max-lora-rank {args.max_lora_rank}")
    return args


def main(argv: list[str]) -> None:
    args = parse(argv)
    print(f"standin vllm: {' '.join(argv)}", flush=True)
    if ENV("RAGTUNE_STANDIN_DIE_ON_START"):
        print("standin vllm: dying on start as asked", flush=True)
        sys.exit(int(ENV("RAGTUNE_STANDIN_DIE_ON_START")))
    child = None
    if ENV("RAGTUNE_STANDIN_CHILD") == "1":  # vLLM's engine core runs in a child process
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    time.sleep(float(ENV("RAGTUNE_STANDIN_START_DELAY") or 0))

    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    base_name = args.served_model_name or args.model
    echo = ENV("RAGTUNE_STANDIN_ECHO") == "1"
    die_after = int(ENV("RAGTUNE_STANDIN_DIE_AFTER") or -1)
    delay = float(ENV("RAGTUNE_STANDIN_DELAY") or 0)
    generators: dict[str, object] = {}
    load_lock = threading.Lock()
    state = {"requests": 0, "in_flight": 0, "peak_in_flight": 0, "arrived": 0}

    def generator(name: str):
        from ragtune.inference import TransformersGenerator

        with load_lock:
            if name not in generators:
                generators[name] = TransformersGenerator(args.model, args.loras.get(name), batch_size=1)
            return generators[name]

    def answer(name: str, messages: list[dict], max_tokens: int) -> tuple[str, int, int, str]:
        user = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        if echo:
            words = user.split()
            return "echo: " + " ".join(words[:max_tokens]), len(words), min(len(words), max_tokens), "stop"
        gen = generator(name)
        gen.system = next((m["content"] for m in messages if m["role"] == "system"), None)
        done = gen.generate_detailed([user], max_tokens)[0]
        return done.text, done.prompt_tokens, done.completion_tokens, done.finish_reason

    app = FastAPI()

    @app.get("/health")
    def health():
        return {}

    @app.get("/v1/models")
    def models():
        data = [{"id": base_name, "object": "model", "root": args.model, "owned_by": "vllm"}]
        data += [{"id": name, "object": "model", "root": path, "parent": base_name, "owned_by": "vllm"}
                 for name, path in args.loras.items()]
        return {"object": "list", "data": data}

    @app.get("/standin/stats")
    def stats():
        return state | {"child_pid": child.pid if child else None, "argv": argv}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        state["arrived"] += 1
        if 0 <= die_after < state["arrived"]:
            os._exit(7)  # mid-run death: the connection drops without an answer
        body = await request.json()
        name = body.get("model")
        if name not in {base_name, *args.loras}:
            return JSONResponse({"error": {"message": f"The model `{name}` does not exist.", "type": "NotFoundError",
                                           "code": 404}}, status_code=404)
        state["in_flight"] += 1
        state["peak_in_flight"] = max(state["peak_in_flight"], state["in_flight"])
        try:
            started = time.monotonic()
            text, prompt_tokens, completion_tokens, finish = await asyncio.to_thread(
                answer, name, body["messages"], int(body.get("max_tokens") or 16))
            await asyncio.sleep(max(0.0, delay - (time.monotonic() - started)))
        finally:
            state["in_flight"] -= 1
        state["requests"] += 1
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        if not body.get("stream"):
            return {"id": ident, "object": "chat.completion", "created": created, "model": name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                    "usage": usage}

        def events():
            head = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name}
            yield f"data: {json.dumps(head | {'choices': [{'index': 0, 'delta': {'role': 'assistant', 'content': text}, 'finish_reason': None}]})}\n\n"
            yield f"data: {json.dumps(head | {'choices': [{'index': 0, 'delta': {}, 'finish_reason': finish}]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main(sys.argv[1:])
