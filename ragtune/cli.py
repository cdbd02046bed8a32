"""The `ragtune` command: serve a bundle, chat with it in the terminal, ask one question, route one.

    ragtune serve [BUNDLE]            OpenAI-compatible API + web chat on http://127.0.0.1:8000
    ragtune chat [BUNDLE] [--url U]   terminal chat, in process or against a running server
    ragtune ask QUESTION [--bundle B] one answer as JSON
    ragtune route QUESTION            maths or reading

Server settings come from params.yaml's `serve` block when there is one (conf/serve/default.yaml),
then from the flags.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any


def _group(key: str, schema: Any, params_path: str = "params.yaml") -> Any:
    """A config group from params.yaml when there is one (a project checkout), else its defaults."""
    from ragtune.config import read_params, validate

    if Path(params_path).exists():
        return read_params(params_path).group(key, schema)
    return validate(schema, {})


def _load_bundle(path: str, verify: str = "size", generator: Any = None):
    from ragtune.bundle import Bundle

    return Bundle.load(path, generator=generator, verify=verify)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ragtune.config import validate
    from ragtune.engine import VllmConfig
    from ragtune.serve import ServeConfig, create_app

    flags = {"host": args.host, "port": args.port, "backend": args.backend, "max_concurrent": args.max_concurrent,
             "torch_threads": args.threads}
    configured = _group("serve", ServeConfig).model_dump()
    settings = validate(ServeConfig, configured | {k: v for k, v in flags.items() if v is not None})
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    with contextlib.ExitStack() as stack:
        generator = None
        if settings.backend == "vllm":
            generator = stack.enter_context(_vllm_engine(args.bundle, _group("vllm", VllmConfig))).generator()
        bundle = _load_bundle(args.bundle, args.verify, generator)
        app = create_app(bundle, settings)
        if settings.token_env and os.environ.get(settings.token_env):
            print(f"bearer token required (from ${settings.token_env})", file=sys.stderr)
        print(f"ragtune: serving {args.bundle} on http://{settings.host}:{settings.port}", file=sys.stderr)
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level)
    return 0


def _vllm_engine(bundle_dir: str, cfg: Any):
    """The managed vLLM engine for a bundle: its base generator, its adapter as LoRA module `ragtune`."""
    from ragtune.bundle import MANIFEST, resolve_base
    from ragtune.engine import VllmEngine
    from ragtune.io import read_json

    folder = Path(bundle_dir)
    manifest = read_json(folder / MANIFEST)
    adapter = folder / manifest["adapter"] if manifest.get("adapter") else None
    return VllmEngine(cfg, resolve_base(folder, manifest), adapter)


def _print_answer(result: dict[str, Any]) -> None:
    print(f"[{result['route']}] {result['text']}")
    if result["route"] == "maths" and result.get("final_answer") is not None:
        print(f"final answer: {result['final_answer']}")
    for i, source in enumerate(result.get("sources") or [], 1):
        print(f"  {i}. [{source['chunk_id']}] {source['text'][:100]}…")


def cmd_chat(args: argparse.Namespace) -> int:
    if args.url:
        from openai import OpenAI

        client = OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=os.environ.get(args.token_env) or "none")

        def answer(question: str) -> None:
            stream = client.chat.completions.create(
                model="ragtune", messages=[{"role": "user", "content": question}], stream=True
            )
            extra: dict[str, Any] = {}
            for chunk in stream:
                extra.update((chunk.model_extra or {}).get("ragtune") or {})
                if chunk.choices and chunk.choices[0].delta.content:
                    print(chunk.choices[0].delta.content, end="", flush=True)
            print()
            print(f"  route: {extra.get('route')}; final answer: {extra.get('final_answer')}")
            for i, source in enumerate(extra.get("sources") or [], 1):
                print(f"  {i}. [{source['chunk_id']}] {source['text'][:100]}…")
    else:
        bundle = _load_bundle(args.bundle, args.verify)

        def answer(question: str) -> None:
            _print_answer(bundle.answer(question, max_new_tokens=args.max_new_tokens))

    print("ragtune chat: type a question, an empty line or Ctrl-D to leave.")
    while True:
        try:
            question = input("> ").strip()
        except EOFError:
            break
        if not question:
            break
        answer(question)
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    bundle = _load_bundle(args.bundle, args.verify)
    result = bundle.answer(" ".join(args.question), max_new_tokens=args.max_new_tokens)
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    from ragtune.router import load_router

    print(load_router(args.router).route_many([" ".join(args.question)])[0])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ragtune", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def bundle_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("bundle", nargs="?", default="bundle", help="bundle folder (default: bundle)")
        p.add_argument("--verify", choices=("size", "full", "none"), default="size",
                       help="check bundle hashes and base sizes (size), base hashes too (full), or nothing")

    serve = sub.add_parser("serve", help="OpenAI-compatible API and web chat")
    bundle_arg(serve)
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--backend", choices=("transformers", "vllm"))
    serve.add_argument("--max-concurrent", type=int, help="streaming generations at once")
    serve.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=cmd_serve)

    chat = sub.add_parser("chat", help="chat in the terminal")
    bundle_arg(chat)
    chat.add_argument("--url", help="a running `ragtune serve` (e.g. http://127.0.0.1:8000) instead of loading the bundle")
    chat.add_argument("--token-env", default="RAGTUNE_API_TOKEN", help="environment variable holding the bearer token")
    chat.add_argument("--max-new-tokens", type=int)
    chat.set_defaults(func=cmd_chat)

    ask = sub.add_parser("ask", help="answer one question, print JSON")
    ask.add_argument("question", nargs="+")
    ask.add_argument("--bundle", default="bundle", help="bundle folder (default: bundle)")
    ask.add_argument("--verify", choices=("size", "full", "none"), default="size")
    ask.add_argument("--max-new-tokens", type=int)
    ask.set_defaults(func=cmd_ask)

    route = sub.add_parser("route", help="route one question")
    route.add_argument("question", nargs="+")
    route.add_argument("--router", default="models/router")
    route.set_defaults(func=cmd_route)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
