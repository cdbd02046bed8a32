"""Teachers for the distill stage, a durable response cache, and the loop that distils GSM8K.

Teachers: `rationale` (offline: GSM8K's own rationale reshaped into <think>…</think> + \\boxed{N}) and
`openai` (any OpenAI-compatible API, DeepSeek-R1 included; `reasoning_content` is folded into <think>).
The loop runs bounded-concurrency rounds over the items not yet accepted; every response is appended
to an fsync'd JSONL cache keyed by (model, messages, sampling, attempt), so a rerun never pays twice.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from ragtune.config import Config, UserError
from ragtune.data import strip_calculator_notes
from ragtune.io import DataError, iter_jsonl
from ragtune.metrics import math_answer, normalize_number
from ragtune.prompts import alpaca_record, chat_messages, math_prompt

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


# --------------------------------------------------------------------------- configuration


class RationaleTeacherConfig(Config):
    """`teacher=gsm8k_rationale`: offline, GSM8K's own rationale reshaped into <think>…</think> + \\boxed{N}."""

    kind: Literal["rationale"] = Field(description="rationale: no model is called")
    name: str = Field(description="recorded in distill's stats")


class OpenAITeacherConfig(Config):
    """`teacher=deepseek_r1` / `openai_compatible`: any OpenAI-compatible chat endpoint."""

    kind: Literal["openai"] = Field(description="openai: called through the openai client")
    name: str = Field(description="recorded in distill's stats")
    base_url: str = Field(description="the endpoint, e.g. https://api.deepseek.com or http://127.0.0.1:8000/v1")
    model: str = Field(description="the model name the endpoint serves")
    api_key_env: str | None = Field(description="environment variable holding the API key (null: none needed)")
    system: str | None = Field(description="system prompt (null: none)")
    temperature: float | None = Field(ge=0, le=2, description="sampling temperature (null: the server's default)")
    top_p: float | None = Field(gt=0, le=1, description="nucleus sampling (null: the server's default)")
    max_tokens: int | None = Field(gt=0, description="cap on each reply's tokens (null: the server's default)")
    timeout: float = Field(gt=0, description="seconds per call")


TeacherConfig = Annotated[RationaleTeacherConfig | OpenAITeacherConfig, Field(discriminator="kind")]


class DistillConfig(Config):
    """`distill` (conf/distill/default.yaml): the rounds, concurrency and retries of the distill loop."""

    max_items: int | None = Field(None, gt=0, description="a seeded subset of GSM8K train (null: every question)")
    max_rounds: int = Field(15, ge=1, description="rounds over the items not accepted yet")
    concurrency: int = Field(8, ge=1, description="teacher calls in flight at once")
    max_retries: int = Field(6, ge=0, description="retries per call on timeouts, 429, 5xx, lost connections, malformed replies")
    backoff_base: float = Field(1.0, gt=0, description="seconds; doubles per retry (with jitter)")
    backoff_max: float = Field(60.0, gt=0, description="cap on one backoff step, seconds")
    max_retry_after: float = Field(300.0, ge=0, description="cap on a server's Retry-After, seconds (longer waits are cut and counted)")
    min_accepted_share: float = Field(
        0.5, ge=0, le=1, description="fail when calls failed and fewer than this share of the items were accepted")
    progress: bool = Field(True, description="a tqdm bar per round")


class TeacherConfigError(UserError, RuntimeError):
    """The teacher cannot work as configured (missing key, rejected key, unknown model): stop at once."""


class TransientError(Exception):
    """A call that may succeed if sent again: timeout, 429, 5xx, lost connection, malformed reply."""

    def __init__(self, reason: str, detail: str = "", retry_after: float | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.retry_after = retry_after


class CallFailed(Exception):
    """A call that will not succeed if sent again (e.g. 400): this attempt is lost, the item stays pending."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# --------------------------------------------------------------------------- items and outputs


def load_items(path: str | os.PathLike) -> list[dict[str, str]]:
    """gsm8k_train.jsonl rows {id, question, rationale, answer}; a bad row names its line."""
    items = []
    for lineno, row in iter_jsonl(path):
        for name in ("id", "question", "answer"):
            if not isinstance(row.get(name), str) or not row[name].strip():
                raise DataError(f"{path}:{lineno}: missing or empty field '{name}'")
        items.append(row)
    return items


def compose_output(content: str, reasoning: str | None = None) -> str:
    """The student's target text: reasoning inside <think>…</think>, then the answer."""
    content = (content or "").strip()
    if reasoning and reasoning.strip():
        return f"{THINK_OPEN}\n{reasoning.strip()}\n{THINK_CLOSE}\n\n{content}"
    return content


def judge(output: str, gold: str) -> tuple[bool, str]:
    """(accepted, reason): accepted only with </think> present and a \\boxed{} value equal to the gold."""
    if THINK_CLOSE not in output:
        return False, "no_think"
    answer_part = output.rsplit(THINK_CLOSE, 1)[1]
    value, how = math_answer(answer_part)
    if how != "boxed":
        return False, "no_box" if how in ("no_box", "no_number") else how
    gold_value = normalize_number(gold)
    if gold_value is None:
        return False, "unparsable_gold"
    return (True, "accepted") if value == gold_value else (False, "wrong_answer")


# --------------------------------------------------------------------------- teachers


@dataclass(frozen=True)
class Reply:
    content: str
    reasoning: str | None = None
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)


class RationaleTeacher:
    """Offline: GSM8K's human-written rationale as the thinking, its gold answer boxed."""

    remote = False

    def __init__(self, cfg: RationaleTeacherConfig):
        self.name = cfg.name

    def answer(self, item: Mapping[str, str]) -> str:
        thinking = strip_calculator_notes(item.get("rationale") or "").strip()
        return compose_output(f"The answer is \\boxed{{{item['answer'].strip()}}}.", thinking)


class OpenAITeacher:
    """Any OpenAI-compatible chat-completions server, called through the `openai` package."""

    remote = True
    SAMPLING_KEYS = ("temperature", "top_p", "max_tokens")

    def __init__(self, cfg: OpenAITeacherConfig, environ: Mapping[str, str] | None = None):
        import openai

        environ = os.environ if environ is None else environ
        self.name = cfg.name
        self.model = cfg.model
        self.system = cfg.system
        self.sampling = {k: getattr(cfg, k) for k in self.SAMPLING_KEYS if getattr(cfg, k) is not None}
        key_env = cfg.api_key_env
        if key_env:
            api_key = environ.get(key_env)
            if not api_key:
                raise TeacherConfigError(
                    f"teacher '{self.name}' needs an API key: set the environment variable {key_env}"
                )
        else:
            api_key = "no-key"  # a local server that checks none; the client insists on some value
        # Retries are ours (counted, jittered, Retry-After honoured), so the client makes exactly one try.
        self.client = openai.OpenAI(
            api_key=api_key, base_url=cfg.base_url, timeout=cfg.timeout, max_retries=0
        )

    def messages(self, item: Mapping[str, str]) -> list[dict[str, str]]:
        return chat_messages(math_prompt(item["question"]), self.system)

    def complete(self, messages: list[dict[str, str]]) -> Reply:
        """One HTTP call. Raises TransientError (worth retrying), CallFailed, or TeacherConfigError."""
        import openai

        try:
            response = self.client.chat.completions.create(
                model=self.model, messages=messages, **self.sampling
            )
        except openai.APITimeoutError:
            raise TransientError("timeout") from None
        except openai.APIConnectionError as err:
            raise TransientError("connection", type(err.__cause__ or err).__name__) from None
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as err:
            raise TeacherConfigError(
                f"teacher '{self.name}' at {self.client.base_url} refused the request "
                f"(HTTP {err.status_code}): check the model name and the API key's environment variable"
            ) from None
        except openai.RateLimitError as err:
            raise TransientError("rate_limited", "HTTP 429", retry_after_seconds(err.response.headers)) from None
        except openai.APIStatusError as err:
            if err.status_code >= 500 or err.status_code in (408, 409):
                raise TransientError("server_error", f"HTTP {err.status_code}",
                                     retry_after_seconds(err.response.headers)) from None
            raise CallFailed("client_error", f"HTTP {err.status_code}") from None
        except (openai.APIResponseValidationError, ValueError) as err:  # JSONDecodeError is a ValueError
            raise TransientError("malformed", type(err).__name__) from None
        return _reply_from(response)


def _reply_from(response: Any) -> Reply:
    """Content, reasoning and usage from a completion; anything missing means a malformed reply."""
    try:
        choice = response.choices[0]
        message = choice.message
        content = message.content
        reasoning = getattr(message, "reasoning_content", None)
        if reasoning is None and getattr(message, "model_extra", None):
            reasoning = message.model_extra.get("reasoning_content")
    except (AttributeError, IndexError, TypeError, KeyError):
        raise TransientError("malformed", "no choices[0].message") from None
    if not isinstance(content, str) or (reasoning is not None and not isinstance(reasoning, str)):
        raise TransientError("malformed", "message content is not text")
    usage = getattr(response, "usage", None)
    usage_counts = {
        k: int(getattr(usage, k)) for k in ("prompt_tokens", "completion_tokens") if isinstance(getattr(usage, k, None), int)
    }
    return Reply(content, reasoning, getattr(choice, "finish_reason", None), usage_counts)


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from `retry-after-ms` or `Retry-After` (seconds or an HTTP date), else None."""
    if not headers:
        return None
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def make_teacher(cfg: RationaleTeacherConfig | OpenAITeacherConfig, environ: Mapping[str, str] | None = None):
    if isinstance(cfg, RationaleTeacherConfig):
        return RationaleTeacher(cfg)
    return OpenAITeacher(cfg, environ)


# --------------------------------------------------------------------------- response cache


def request_key(model: str, messages: list[dict[str, str]], sampling: Mapping[str, Any], attempt: int) -> str:
    """The cache key: the same request for the same attempt number is never sent twice."""
    blob = json.dumps(
        {"model": model, "messages": messages, "sampling": dict(sampling), "attempt": attempt},
        sort_keys=True, ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """Append-only JSONL of teacher responses; each line is fsync'd before the response is used.

    A torn last line (the process killed mid-write) is cut off on open; any other unreadable line
    is skipped and counted, since a cache must never block the pipeline.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.entries: dict[str, dict[str, Any]] = {}
        self.skipped_lines = 0
        self.torn_bytes = 0
        self._lock = threading.Lock()
        self._load()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        complete_end = data.rfind(b"\n") + 1
        if complete_end < len(data):  # torn tail: drop it so the next append starts a fresh line
            self.torn_bytes = len(data) - complete_end
            with open(self.path, "r+b") as fh:
                fh.truncate(complete_end)
                os.fsync(fh.fileno())
        for line in data[:complete_end].splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                self.entries[record["key"]] = record
            except (ValueError, KeyError, TypeError):
                self.skipped_lines += 1

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            os.write(self._fd, line)
            os.fsync(self._fd)
            self.entries[record["key"]] = record

    def __len__(self) -> int:
        return len(self.entries)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class RetryPolicy:
    """How calls are retried (built from DistillConfig, which holds the defaults)."""

    max_retries: int
    backoff_base: float
    backoff_max: float
    max_retry_after: float

    def capped(self, retry_after: float | None) -> float | None:
        """A server's Retry-After, at most `max_retry_after` (`Retry-After: 100000` must not stall a run for a day)."""
        return None if retry_after is None else min(retry_after, self.max_retry_after)

    def delay(self, retry: int, retry_after: float | None, rng: random.Random) -> float:
        """Exponential backoff with 'equal' jitter (never below half the step); Retry-After (capped) wins if longer."""
        step = min(self.backoff_max, self.backoff_base * (2**retry))
        jittered = step / 2 + rng.uniform(0, step / 2)
        return max(jittered, self.capped(retry_after) or 0.0)


@dataclass
class Outcome:
    """What one item's attempt in one round came to."""

    item_index: int
    accepted: bool = False
    reason: str = ""
    output: str = ""
    answered: bool = False  # a response exists (fresh or cached) so the item's attempt counter advances
    cache_hit: bool = False
    calls: int = 0
    retries: int = 0
    errors: Counter = field(default_factory=Counter)
    usage: Counter = field(default_factory=Counter)


@dataclass
class DistillResult:
    accepted: list[tuple[dict, str]]  # (item, output), in input order
    left: list[dict]  # items never accepted, each with its last rejection reason
    stats: dict[str, Any]


class Distiller:
    def __init__(
        self,
        teacher,
        cache: ResponseCache | None,
        *,
        max_rounds: int,
        concurrency: int,
        retry: RetryPolicy,
        seed: int,
        progress: bool = False,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if teacher.remote and cache is None:
            raise ValueError("a remote teacher needs a response cache")
        self.teacher, self.cache = teacher, cache
        self.max_rounds, self.concurrency = int(max_rounds), max(1, int(concurrency))
        self.retry, self.progress, self.sleep = retry, progress, sleep
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        # After a 429 with Retry-After, every worker holds off until then, not just the one that got it.
        self._not_before = 0.0
        self._pause_lock = threading.Lock()

    # ---- one call, with retries
    def _call(self, messages: list[dict[str, str]], outcome: Outcome) -> Reply | None:
        for retry in range(self.retry.max_retries + 1):
            wait = self._not_before - time.monotonic()
            if wait > 0:
                self.sleep(wait)
            outcome.calls += 1
            try:
                return self.teacher.complete(messages)
            except TransientError as err:
                outcome.errors[err.reason] += 1
                if retry == self.retry.max_retries:
                    outcome.reason = f"failed_{err.reason}"
                    return None
                with self._rng_lock:
                    delay = self.retry.delay(retry, err.retry_after, self._rng)
                if err.retry_after:
                    if err.retry_after > self.retry.max_retry_after:
                        outcome.errors["retry_after_capped"] += 1
                    with self._pause_lock:
                        pause = time.monotonic() + self.retry.capped(err.retry_after)
                        self._not_before = max(self._not_before, pause)
                outcome.retries += 1
                self.sleep(delay)
            except CallFailed as err:
                outcome.errors[err.reason] += 1
                outcome.reason = f"failed_{err.reason}"
                return None
            except TeacherConfigError:
                raise
            except Exception as err:  # one odd failure must not abort the round: lose this attempt only
                outcome.errors["unexpected"] += 1
                outcome.reason = f"failed_unexpected_{type(err).__name__}"
                return None
        return None

    # ---- one item, one attempt
    def _attempt(self, index: int, item: dict, attempt: int) -> Outcome:
        outcome = Outcome(index)
        if not self.teacher.remote:
            output = self.teacher.answer(item)
        else:
            messages = self.teacher.messages(item)
            key = request_key(self.teacher.model, messages, self.teacher.sampling, attempt)
            record = self.cache.get(key)
            if record is not None:
                outcome.cache_hit = True
            else:
                reply = self._call(messages, outcome)
                if reply is None:
                    return outcome
                record = {
                    "key": key, "model": self.teacher.model, "item_id": item["id"], "attempt": attempt,
                    "content": reply.content, "reasoning": reply.reasoning,
                    "finish_reason": reply.finish_reason, "usage": reply.usage, "time": time.time(),
                }
                self.cache.put(record)
                outcome.usage.update(reply.usage)
            output = compose_output(record["content"], record.get("reasoning"))
        outcome.answered = True
        outcome.output = output
        outcome.accepted, outcome.reason = judge(output, item["answer"])
        return outcome

    def run(self, items: Sequence[dict]) -> DistillResult:
        from tqdm import tqdm

        started = time.monotonic()
        attempts = [0] * len(items)  # responses received per item: the next attempt number
        last_reason = ["not_tried"] * len(items)
        accepted: dict[int, str] = {}
        totals: Counter = Counter()
        errors: Counter = Counter()
        rejected: Counter = Counter()
        usage: Counter = Counter()
        accepted_per_round: list[int] = []
        pending = list(range(len(items)))
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="teacher") as pool:
            for round_no in range(1, self.max_rounds + 1):
                if not pending:
                    break
                newly = 0
                bar = tqdm(total=len(pending), desc=f"distill round {round_no}", unit="item",
                           disable=not self.progress, mininterval=1.0)
                futures = [pool.submit(self._attempt, i, items[i], attempts[i]) for i in pending]
                try:
                    for future in as_completed(futures):
                        out = future.result()
                        i = out.item_index
                        totals["calls"] += out.calls
                        totals["retries"] += out.retries
                        totals["cache_hits"] += out.cache_hit
                        totals["failed_calls"] += (not out.answered) and out.calls > 0
                        errors.update(out.errors)
                        usage.update(out.usage)
                        attempts[i] += out.answered
                        last_reason[i] = out.reason
                        if out.accepted:
                            accepted[i] = out.output
                            newly += 1
                        elif out.answered:
                            rejected[out.reason] += 1
                        bar.update(1)
                        bar.set_postfix(accepted=len(accepted), calls=totals["calls"], refresh=False)
                except BaseException:  # a config error or Ctrl-C: don't start the queued calls
                    for future in futures:
                        future.cancel()
                    raise
                bar.close()
                accepted_per_round.append(newly)
                pending = [i for i in pending if i not in accepted]
        stats = {
            "teacher": self.teacher.name,
            "items": len(items),
            "accepted": len(accepted),
            "left": len(items) - len(accepted),
            "rounds": len(accepted_per_round),
            "accepted_per_round": accepted_per_round,
            "calls": totals["calls"],
            "cache_hits": totals["cache_hits"],
            "retries": totals["retries"],
            "failed_calls": totals["failed_calls"],
            "errors": dict(sorted(errors.items())),
            "rejected": dict(sorted(rejected.items())),
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "concurrency": self.concurrency,
            "elapsed_s": round(time.monotonic() - started, 3),
        }
        if self.cache is not None:
            stats["cache_entries"] = len(self.cache)
            stats["cache_torn_bytes_dropped"] = self.cache.torn_bytes
            stats["cache_lines_skipped"] = self.cache.skipped_lines
        left = [dict(items[i], reason=last_reason[i], attempts=attempts[i]) for i in range(len(items)) if i not in accepted]
        return DistillResult([(items[i], accepted[i]) for i in sorted(accepted)], left, stats)


def alpaca_rows(result: DistillResult) -> list[dict[str, str]]:
    """distilled_train.json: the prompt sft trains on and eval asks with, and the teacher's output."""
    return [alpaca_record(math_prompt(item["question"]), output) for item, output in result.accepted]


def retry_policy(cfg: DistillConfig) -> RetryPolicy:
    return RetryPolicy(max_retries=cfg.max_retries, backoff_base=cfg.backoff_base, backoff_max=cfg.backoff_max,
                       max_retry_after=cfg.max_retry_after)


class DistillFailed(UserError):
    """Too little was distilled because teacher calls failed: sft must not quietly train without maths."""


def check_enough_accepted(stats: Mapping[str, Any], min_accepted_share: float) -> None:
    """Raise DistillFailed when nothing was accepted, or when calls failed and fewer than
    `min_accepted_share` of the items were accepted; the message names the commonest errors."""
    items, accepted = stats["items"], stats["accepted"]
    if not items:
        return
    share = accepted / items
    if accepted and (share >= min_accepted_share or not stats["failed_calls"]):
        return
    errors = sorted(stats["errors"].items(), key=lambda kv: -kv[1])[:3]
    rejected = sorted(stats["rejected"].items(), key=lambda kv: -kv[1])[:3]
    cause = ", ".join(f"{n} × {k}" for k, n in errors) or "no call failed"
    if rejected:
        cause += "; answers rejected: " + ", ".join(f"{n} × {k}" for k, n in rejected)
    raise DistillFailed(
        f"only {accepted} of {items} items accepted ({share:.0%}, distill.min_accepted_share is "
        f"{min_accepted_share:.0%}); {stats['failed_calls']} calls failed for good: {cause}. "
        f"Check the teacher (teacher.base_url, teacher.model) and rerun: answered calls are cached")
