"""Text generation behind one interface, two backends.

`TransformersGenerator` runs the base checkpoint (optionally with a LoRA adapter) in process with
batched greedy decoding; `OpenAIGenerator` asks any OpenAI-compatible `/v1/chat/completions`
endpoint (vLLM, DeepSeek, ragtune's own server). Both turn one user text into one answer through
the model's chat template (`ragtune.prompts`), so eval, the server and the bundle see the same prompts.
Greedy by default: sampled outputs (the seed used temperature 0.6) cannot be reproduced.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ragtune.prompts import apply_chat_template, chat_messages


class Generator(Protocol):
    def generate(self, user_texts: Sequence[str], max_new_tokens: int) -> list[str]: ...


@dataclass
class Completion:
    """One answer with what an OpenAI-style response reports about it."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"  # "length" when the token budget cut it off


_RAGGED_END = re.compile(r"[\s\ufffd]+$")


def _clean(text: str) -> str:
    # a token budget can end inside a multi-byte character: drop the undecodable tail too
    return _RAGGED_END.sub("", text.strip())


def _finish_reason(hit_eos: bool, new_tokens: int, max_new_tokens: int) -> str:
    return "stop" if hit_eos or new_tokens < max_new_tokens else "length"


class _StreamWatch:
    """A stopping criterion that counts decoding steps and stops when the consumer has gone."""

    def __init__(self, cancel: threading.Event | None):
        self.cancel, self.steps, self.last_token = cancel, 0, None

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.steps += 1
        self.last_token = int(input_ids[0, -1])
        stop = self.cancel is not None and self.cancel.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class TransformersGenerator:
    """In-process generation: batched greedy decoding with left padding.

    Prompts are sorted by token length before batching so that each batch holds little padding;
    answers come back in the caller's order, decoded without special tokens and stripped (also of
    a half character left where the token budget ran out).
    """

    def __init__(
        self,
        base_dir: str | os.PathLike,
        adapter_dir: str | os.PathLike | None = None,
        *,
        batch_size: int = 8,
        dtype: str = "float32",
        device: str = "cpu",
        system: str | None = None,
        merge_adapter: bool = True,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.base_dir = Path(base_dir)
        self.adapter_dir = Path(adapter_dir) if adapter_dir else None
        self.batch_size = max(1, int(batch_size))
        self.system = system
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        self.tokenizer.padding_side = "left"  # decoder-only: new tokens must follow the prompt directly
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = device
        model = AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=getattr(torch, dtype)).to(device)
        if self.adapter_dir is not None:
            from peft import PeftModel

            if not (self.adapter_dir / "adapter_config.json").exists():
                raise FileNotFoundError(f"{self.adapter_dir}: no adapter_config.json (not a peft adapter)")
            model = PeftModel.from_pretrained(model, self.adapter_dir)
            if merge_adapter:  # same function, no per-layer LoRA detour at every decoding step
                model = model.merge_and_unload()
        self.model = model.eval()
        self._lock = threading.Lock()  # one forward pass at a time when a server shares the model

    def prompt(self, user_text: str) -> str:
        return apply_chat_template(self.tokenizer, user_text, self.system)

    def _generation_kwargs(self, max_new_tokens: int) -> dict[str, Any]:
        return {
            "max_new_tokens": int(max_new_tokens),
            "do_sample": False,
            "temperature": None,
            "top_p": None,
            "top_k": None,
            "pad_token_id": self.tokenizer.pad_token_id,
        }

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        return ids | ({self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set())

    def generate(self, user_texts: Sequence[str], max_new_tokens: int) -> list[str]:
        return [c.text for c in self.generate_detailed(user_texts, max_new_tokens)]

    def generate_detailed(self, user_texts: Sequence[str], max_new_tokens: int) -> list[Completion]:
        import torch

        prompts = [self.prompt(t) for t in user_texts]
        lengths = [len(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
        eos_ids = self._eos_ids()
        answers: list[Completion] = [Completion("")] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            enc = self.tokenizer(
                [prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(self.device)
            with self._lock, torch.inference_mode():
                out = self.model.generate(**enc, **self._generation_kwargs(max_new_tokens))
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for row, i, text in zip(new_tokens.tolist(), batch, texts, strict=True):
                ended = next((n for n, token in enumerate(row, start=1) if token in eos_ids), None)
                answers[i] = Completion(
                    _clean(text),
                    prompt_tokens=lengths[i],
                    completion_tokens=ended or len(row),
                    finish_reason=_finish_reason(ended is not None, len(row), max_new_tokens),
                )
        return answers

    def stream(
        self,
        user_text: str,
        max_new_tokens: int,
        cancel: threading.Event | None = None,
        stats: dict[str, Any] | None = None,
    ) -> Iterator[str]:
        """Pieces of the answer as they are decoded (for the server's streaming responses). Setting
        `cancel` (the client went away) stops decoding at the next token; `stats` receives
        prompt_tokens, completion_tokens and finish_reason at the end."""
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        enc = self.tokenizer([self.prompt(user_text)], return_tensors="pt", add_special_tokens=False).to(self.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        eos_ids = self._eos_ids()
        watch = _StreamWatch(cancel)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                with self._lock, torch.inference_mode():
                    if cancel is not None and cancel.is_set():  # gone while waiting for the model
                        streamer.end()
                        return
                    self.model.generate(
                        **enc,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([watch]),
                        **self._generation_kwargs(max_new_tokens),
                    )
            except BaseException as err:  # surfaced to the consumer below
                errors.append(err)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        # Hold back leading whitespace and any whitespace or half character at the current end, so
        # the streamed text adds up to exactly what `generate` returns (`_clean`).
        pending, started = "", False
        for piece in streamer:
            pending += piece
            if not started:
                pending = pending.lstrip()
                started = bool(pending)
            ready = len(_RAGGED_END.sub("", pending))
            if ready:
                yield pending[:ready]
                pending = pending[ready:]
        thread.join()
        if errors:
            raise errors[0]
        if stats is not None:
            stats.update(
                prompt_tokens=int(enc["input_ids"].shape[1]),
                completion_tokens=watch.steps,
                finish_reason=_finish_reason(watch.last_token in eos_ids, watch.steps, max_new_tokens),
            )


class OpenAIGenerator:
    """Any OpenAI-compatible chat endpoint; requests run concurrently, greedy (temperature 0)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = None,
        timeout: float = 120.0,
        max_concurrency: int = 8,
        system: str | None = None,
        max_retries: int = 2,
    ):
        from openai import OpenAI

        api_key = "EMPTY"  # local servers (vLLM, ragtune serve) accept any key
        if api_key_env:
            api_key = os.environ.get(api_key_env) or ""
            if not api_key:
                raise RuntimeError(f"environment variable {api_key_env} is empty: it must hold the API key")
        self.model = model
        self.system = system
        self.max_concurrency = max(1, int(max_concurrency))
        self.client = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)

    def _one(self, user_text: str, max_new_tokens: int) -> Completion:
        resp = self.client.chat.completions.create(
            model=self.model,
            messages=chat_messages(user_text, self.system),
            max_tokens=int(max_new_tokens),
            temperature=0.0,
        )
        usage = resp.usage
        return Completion(
            (resp.choices[0].message.content or "").strip(),
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            finish_reason=resp.choices[0].finish_reason or "stop",
        )

    def generate(self, user_texts: Sequence[str], max_new_tokens: int) -> list[str]:
        return [c.text for c in self.generate_detailed(user_texts, max_new_tokens)]

    def generate_detailed(self, user_texts: Sequence[str], max_new_tokens: int) -> list[Completion]:
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return list(pool.map(lambda t: self._one(t, max_new_tokens), user_texts))

    def stream(
        self,
        user_text: str,
        max_new_tokens: int,
        cancel: threading.Event | None = None,
        stats: dict[str, Any] | None = None,
    ) -> Iterator[str]:
        chunks = self.client.chat.completions.create(
            model=self.model,
            messages=chat_messages(user_text, self.system),
            max_tokens=int(max_new_tokens),
            temperature=0.0,
            stream=True,
        )
        with chunks:  # closing it drops the connection, so the server stops generating
            for chunk in chunks:
                if cancel is not None and cancel.is_set():
                    return
                if chunk.choices and chunk.choices[0].finish_reason and stats is not None:
                    stats["finish_reason"] = chunk.choices[0].finish_reason
                if chunk.choices and (piece := chunk.choices[0].delta.content):
                    yield piece


def load_generator(cfg: dict[str, Any]) -> TransformersGenerator | OpenAIGenerator:
    """A generator from config: `{backend: transformers, base_dir, adapter_dir?, batch_size?, dtype?}`
    or `{backend: openai, base_url, model, api_key_env?, timeout?, max_concurrency?}`; `system` for both."""
    backend = cfg.get("backend", "transformers")
    if backend == "transformers":
        return TransformersGenerator(cfg["base_dir"], adapter_dir=cfg.get("adapter_dir"), batch_size=cfg["batch_size"],
                                     dtype=cfg["dtype"], device=cfg["device"], system=cfg["system"])
    if backend == "openai":
        return OpenAIGenerator(cfg["base_url"], cfg["model"], api_key_env=cfg["api_key_env"], timeout=cfg["timeout"],
                               max_concurrency=cfg["max_concurrency"], system=cfg["system"])
    raise ValueError(f"unknown generator backend '{backend}' (expected transformers or openai)")
