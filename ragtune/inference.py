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
    repetition_stopped: bool = False  # the repetition guard ended a loop (finish_reason stays "stop")
    forced_box: bool = False  # a maths answer without a box got one (package.force_box)


_RAGGED_END = re.compile(r"[\s\ufffd]+$")


def _clean(text: str) -> str:
    # a token budget can end inside a multi-byte character: drop the undecodable tail too
    return _RAGGED_END.sub("", text.strip())


def _finish_reason(hit_eos: bool, new_tokens: int, max_new_tokens: int) -> str:
    return "stop" if hit_eos or new_tokens < max_new_tokens else "length"


def repeating_period(tokens: Sequence[int], window: int) -> int | None:
    """The shortest period p (at most window // 3) such that the last `window` tokens repeat every p
    tokens, or None: a loop like '1 1 1 1 ...' or '= 24 = 24 = 24 ...'. Legitimate text repeats a
    span three times over `window` tokens (48 by default) almost never."""
    if window <= 0 or len(tokens) < window:
        return None
    tail = list(tokens[-window:])
    for period in range(1, window // 3 + 1):
        if tail[period:] == tail[:-period]:
            return period
    return None


def cut_loop(tokens: list[int], window: int) -> tuple[list[int], bool]:
    """`tokens` with a repeating tail (see repeating_period) cut down to one copy of the repeated unit."""
    period = repeating_period(tokens, window)
    if period is None:
        return tokens, False
    start = len(tokens) - window
    while start > 0 and tokens[start - 1] == tokens[start - 1 + period]:
        start -= 1
    return tokens[: start + period], True


class _Watch:
    """Stopping criterion for batched and streamed decoding: ends a row whose new tokens loop
    (repetition guard), and every row once `cancel` is set (the client went away)."""

    def __init__(self, prompt_len: int, window: int, cancel: threading.Event | None = None):
        self.prompt_len, self.window, self.cancel = prompt_len, window, cancel
        self.steps, self.last_token = 0, None

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.steps += 1
        self.last_token = int(input_ids[0, -1])
        stop = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.cancel is not None and self.cancel.is_set():
            return stop | True
        new = input_ids[:, self.prompt_len :]
        if self.window and new.shape[1] >= self.window:
            tail = new[:, -self.window :]
            for period in range(1, self.window // 3 + 1):
                stop |= (tail[:, period:] == tail[:, :-period]).all(dim=1)
        return stop


class TransformersGenerator:
    """In-process generation: batched greedy decoding with left padding.

    Prompts are sorted by token length before batching so that each batch holds little padding;
    answers come back in the caller's order, decoded without special tokens and stripped (also of
    a half character left where the token budget ran out). A repetition guard (`repeat_window`
    tokens, 0 = off) ends a row that loops and keeps one copy of the repeated unit.
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
        repeat_window: int = 0,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.base_dir = Path(base_dir)
        self.adapter_dir = Path(adapter_dir) if adapter_dir else None
        self.batch_size = max(1, int(batch_size))
        self.system, self.device, self.repeat_window = system, device, int(repeat_window)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        self.tokenizer.padding_side = "left"  # decoder-only: new tokens must follow the prompt directly
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=getattr(torch, dtype))
        if self.adapter_dir is not None:
            from peft import PeftModel

            if not (self.adapter_dir / "adapter_config.json").exists():
                raise FileNotFoundError(f"{self.adapter_dir}: no adapter_config.json (not a peft adapter)")
            model = PeftModel.from_pretrained(model, self.adapter_dir)
            if merge_adapter:  # same function, no per-layer LoRA detour at every decoding step
                model = model.merge_and_unload()
        self.model = model.to(device).eval()
        self._lock = threading.Lock()  # one forward pass at a time when a server shares the model

    def prompt(self, user_text: str, prefix: str = "") -> str:
        """The chat-templated prompt; `prefix` starts the assistant's turn (to continue an answer)."""
        return apply_chat_template(self.tokenizer, user_text, self.system) + prefix

    def count_tokens(self, user_text: str) -> int:
        return len(self.tokenizer(self.prompt(user_text), add_special_tokens=False)["input_ids"])

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

    def generate_detailed(self, user_texts: Sequence[str], max_new_tokens: int,
                          prefixes: Sequence[str] | None = None) -> list[Completion]:
        """Greedy answers; with `prefixes`, each answer continues the given start of the assistant's turn
        (the returned text is the continuation only)."""
        import torch
        from transformers import StoppingCriteriaList

        prompts = [self.prompt(t, prefixes[i] if prefixes else "") for i, t in enumerate(user_texts)]
        lengths = [len(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
        eos_ids = self._eos_ids()
        answers: list[Completion] = [Completion("")] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            enc = self.tokenizer(
                [prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(self.device)
            watch = _Watch(enc["input_ids"].shape[1], self.repeat_window)
            with self._lock, torch.inference_mode():
                out = self.model.generate(**enc, stopping_criteria=StoppingCriteriaList([watch]),
                                          **self._generation_kwargs(max_new_tokens))
            for row, i in zip(out[:, enc["input_ids"].shape[1] :].tolist(), batch, strict=True):
                answers[i] = self._completion(row, lengths[i], max_new_tokens, eos_ids)
        return answers

    def _completion(self, row: list[int], prompt_tokens: int, max_new_tokens: int, eos_ids: set[int]) -> Completion:
        """Decode one row: up to its first EOS (a row the guard stopped is padded with EOS too), with a
        repeating tail cut to one copy of its unit."""
        ended = next((n for n, token in enumerate(row, start=1) if token in eos_ids), None)
        body, looped = cut_loop(row[: ended - 1] if ended else row, self.repeat_window)
        return Completion(
            _clean(self.tokenizer.decode(body, skip_special_tokens=True)),
            prompt_tokens=prompt_tokens,
            completion_tokens=(ended - 1 if looped else ended) if ended else len(row),
            finish_reason="stop" if looped else _finish_reason(ended is not None, len(row), max_new_tokens),
            repetition_stopped=looped,
        )

    def stream(
        self,
        user_text: str,
        max_new_tokens: int,
        cancel: threading.Event | None = None,
        stats: dict[str, Any] | None = None,
        prefix: str = "",
    ) -> Iterator[str]:
        """Pieces of the answer as they are decoded (for the server's streaming responses). Setting
        `cancel` (the client went away) stops decoding at the next token; the repetition guard ends a
        loop (its repeats may already be streamed); `stats` receives prompt_tokens,
        completion_tokens, finish_reason and repetition_stopped at the end."""
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        enc = self.tokenizer([self.prompt(user_text, prefix)], return_tensors="pt", add_special_tokens=False).to(self.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        eos_ids = self._eos_ids()
        watch = _Watch(enc["input_ids"].shape[1], self.repeat_window, cancel)
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
            hit_eos = watch.last_token in eos_ids
            looped = not hit_eos and watch.steps < max_new_tokens and not (cancel is not None and cancel.is_set())
            stats.update(
                prompt_tokens=int(enc["input_ids"].shape[1]),
                completion_tokens=watch.steps,
                finish_reason="stop" if looped else _finish_reason(hit_eos, watch.steps, max_new_tokens),
                repetition_stopped=looped,
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

    def _messages(self, user_text: str, prefix: str = "") -> tuple[list[dict[str, str]], dict[str, Any]]:
        """The chat messages, and vLLM's way to continue a started assistant turn when `prefix` is given."""
        messages = chat_messages(user_text, self.system)
        if not prefix:
            return messages, {}
        continued = messages + [{"role": "assistant", "content": prefix}]
        return continued, {"extra_body": {"continue_final_message": True, "add_generation_prompt": False}}

    def _one(self, user_text: str, max_new_tokens: int, prefix: str = "") -> Completion:
        messages, extra = self._messages(user_text, prefix)
        resp = self.client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=int(max_new_tokens), temperature=0.0, **extra
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

    def generate_detailed(self, user_texts: Sequence[str], max_new_tokens: int,
                          prefixes: Sequence[str] | None = None) -> list[Completion]:
        prefixes = prefixes or [""] * len(user_texts)
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return list(pool.map(lambda tp: self._one(tp[0], max_new_tokens, tp[1]), zip(user_texts, prefixes)))

    def stream(
        self,
        user_text: str,
        max_new_tokens: int,
        cancel: threading.Event | None = None,
        stats: dict[str, Any] | None = None,
        prefix: str = "",
    ) -> Iterator[str]:
        messages, extra = self._messages(user_text, prefix)
        chunks = self.client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=int(max_new_tokens), temperature=0.0, stream=True, **extra
        )
        with chunks:  # closing it drops the connection, so the server stops generating
            for chunk in chunks:
                if cancel is not None and cancel.is_set():
                    return
                if chunk.choices and chunk.choices[0].finish_reason and stats is not None:
                    stats["finish_reason"] = chunk.choices[0].finish_reason
                if chunk.choices and (piece := chunk.choices[0].delta.content):
                    yield piece
