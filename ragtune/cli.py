"""The `ragtune` command: serve a bundle, chat with it in the terminal, ask one question, route one.

    ragtune serve [BUNDLE]            OpenAI-compatible API + web chat on http://127.0.0.1:8000
                                      (another --host needs a token in $RAGTUNE_API_TOKEN, or
                                      --insecure-no-token; --allow-host NAME for its Host names)
    ragtune chat [BUNDLE] [--url U]   terminal chat, in process or against a running server
    ragtune ask QUESTION [--bundle B] one answer as JSON
    ragtune route QUESTION            maths or reading
    ragtune export [--adapter A] [--base B] [--out O]
                                      the adapter merged into its base: a standalone model folder
                                      (vLLM without LoRA, llama.cpp, Ollama), checked against base + adapter

Server settings come from params.yaml's `serve` block when there is one (conf/serve/default.yaml),
then from the flags; so do `--device`/`--dtype` (params.yaml's top-level `device`/`dtype`, else auto:
CUDA and bf16 when there is a GPU). An error that is the user's to fix is one line `ragtune: <message>` and exit code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from ragtune.config import UserError


def _group(key: str, schema: Any, params_path: str = "params.yaml") -> Any:
    """A config group from params.yaml when there is one (a project checkout), else its defaults."""
    from ragtune.config import read_params, validate

    if Path(params_path).exists():
        return read_params(params_path).group(key, schema)
    return validate(schema, {})


def _placement(args: argparse.Namespace, params_path: str = "params.yaml") -> tuple[str, str]:
    """(device, dtype): the flags, else params.yaml's top level when there is one, else auto."""
    from ragtune.config import read_params
    from ragtune.devices import placement

    device, dtype = "auto", "auto"
    if Path(params_path).exists():
        common = read_params(params_path).common()
        device, dtype = common.device, common.dtype
    return placement(getattr(args, "device", None) or device, getattr(args, "dtype", None) or dtype)


def _load_bundle(path: str, verify: str = "size", generator: Any = None, placement: tuple[str, str] = ("cpu", "float32")):
    from ragtune.bundle import Bundle

    device, dtype = placement
    return Bundle.load(path, generator=generator, verify=verify, device=device, dtype=dtype)


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from ragtune.config import validate
    from ragtune.engine import VllmConfig
    from ragtune.serve import (
        ServeConfig,
        check_exposure,
        configured_token,
        create_app,
        is_loopback,
        uvicorn_config,
    )

    flags = {"host": args.host, "port": args.port, "backend": args.backend, "max_concurrent": args.max_concurrent,
             "torch_threads": args.threads}
    configured = _group("serve", ServeConfig).model_dump()
    if args.allow_host:
        flags["allowed_hosts"] = configured["allowed_hosts"] + args.allow_host
    settings = validate(ServeConfig, configured | {k: v for k, v in flags.items() if v is not None})
    warning = check_exposure(settings, args.insecure_no_token)  # before anything slow: a refusal is immediate
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    with contextlib.ExitStack() as stack:
        generator = None
        if settings.backend == "vllm":
            engine = _vllm_engine(args.bundle, _group("vllm", VllmConfig), dtype=_placement(args)[1])
            generator = stack.enter_context(engine).generator()
        bundle = _load_bundle(args.bundle, args.verify, generator, _placement(args))
        app = create_app(bundle, settings)
        if configured_token(settings):
            print(f"bearer token required (from ${settings.token_env})", file=sys.stderr)
        if not is_loopback(settings.host) and "*" not in settings.allowed_hosts:
            print(f"answering requests whose Host is one of: {', '.join(settings.allowed_hosts)} "
                  "(add this machine's names with --allow-host NAME)", file=sys.stderr)
        if warning:
            print(_banner(f"WARNING: {warning} (--insecure-no-token)"), file=sys.stderr)
        shown_host = f"[{settings.host}]" if ":" in settings.host else settings.host
        print(f"ragtune: serving {args.bundle} on http://{shown_host}:{settings.port}", file=sys.stderr)
        level = logging.DEBUG if args.log_level == "trace" else args.log_level.upper()
        logging.basicConfig(format="%(levelname)s:     %(message)s", level=level)  # ragtune.serve's own lines
        # Ctrl-C: uvicorn shuts down gracefully, then re-raises it; leaving the block normally stops vllm too
        with contextlib.suppress(KeyboardInterrupt):
            uvicorn.Server(uvicorn_config(app, settings.host, settings.port, args.log_level)).run()
    return 0


def _banner(text: str) -> str:
    line = "!" * min(100, len(text) + 4)
    return f"{line}\n! {text}\n{line}"


def _vllm_engine(bundle_dir: str, cfg: Any, dtype: str | None = None):
    """The managed vLLM engine for a bundle: its base generator, its adapter as LoRA module `ragtune`."""
    from ragtune.bundle import MANIFEST, resolve_base
    from ragtune.engine import VllmEngine
    from ragtune.io import read_json

    folder = Path(bundle_dir)
    manifest = read_json(folder / MANIFEST)
    adapter = folder / manifest["adapter"] if manifest.get("adapter") else None
    return VllmEngine(cfg, resolve_base(folder, manifest), adapter, dtype=dtype)


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
            import openai

            try:
                stream = client.chat.completions.create(
                    model="ragtune", messages=[{"role": "user", "content": question}], stream=True
                )
            except openai.APIError as err:  # not running, a wrong token, a refused question
                raise UserError(f"{args.url}: {err}") from None
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
        bundle = _load_bundle(args.bundle, args.verify, placement=_placement(args))

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
    bundle = _load_bundle(args.bundle, args.verify, placement=_placement(args))
    result = bundle.answer(" ".join(args.question), max_new_tokens=args.max_new_tokens)
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ragtune.config import read_params
    from ragtune.devices import resolve_device
    from ragtune.export import export_merged

    device = args.device or (read_params("params.yaml").common().device if Path("params.yaml").exists() else "auto")
    export_merged(args.base, args.adapter, args.out, device=resolve_device(device), dtype=args.dtype or "auto",
                  tolerance=args.tolerance, print_fn=lambda line: print(line, file=sys.stderr))
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
        placement_args(p)

    def placement_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: params.yaml's `device`, else auto)")
        p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                       help="generation precision (default: params.yaml's `dtype`, else auto: bf16 on CUDA)")

    serve = sub.add_parser("serve", help="OpenAI-compatible API and web chat")
    bundle_arg(serve)
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--backend", choices=("transformers", "vllm"))
    serve.add_argument("--max-concurrent", type=int, help="streaming generations at once")
    serve.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    serve.add_argument("--allow-host", action="append", metavar="NAME",
                       help="also answer requests whose Host header names NAME (repeatable; '*': any)")
    serve.add_argument("--insecure-no-token", action="store_true",
                       help="serve on a non-loopback address without a bearer token (anyone who can reach it can use it)")
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug", "trace"))
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
    placement_args(ask)
    ask.set_defaults(func=cmd_ask)

    export = sub.add_parser("export", help="merge the LoRA adapter into its base: a standalone model folder")
    export.add_argument("--adapter", default="models/sft/adapter", help="peft adapter (default: models/sft/adapter)")
    export.add_argument("--base", default="models/base/generator", help="base model (default: models/base/generator)")
    export.add_argument("--out", default="models/merged", help="output folder (default: models/merged)")
    export.add_argument("--device", help="where the parity check runs (default: params.yaml's `device`, else auto)")
    export.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                        help="dtype of the saved weights (default: auto, the base's own)")
    export.add_argument("--tolerance", type=float,
                        help="largest |logit difference| accepted (default: 1e-3 in float32; see ragtune.export)")
    export.set_defaults(func=cmd_export)

    route = sub.add_parser("route", help="route one question")
    route.add_argument("question", nargs="+")
    route.add_argument("--router", default="models/router")
    route.set_defaults(func=cmd_route)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; an error that is the user's to fix (UserError: bad data, settings, a refused
    bundle, an engine that will not start) is one line `ragtune: <message>` on stderr and exit code 1."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"ragtune: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
