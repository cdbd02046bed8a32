"""The RAG bundle: everything `ragtune serve` needs to answer, in one folder, and the answering itself.

    bundle/
      manifest.json   sha256 of every file below and of the base generator's files, the answer settings
      kb.jsonl        the knowledge base (chunk_id, article_id, title, text)
      index/          the served retriever (ragtune.retrieval, saved: BM25, dense or hybrid)
      router/         the maths/reading router (ragtune.router, saved as JSON: nothing in a bundle executes)
      adapter/        the LoRA adapter (absent in the base bundle, which serves the base model)
      prompts.json    the prompt templates the bundle was built with (loading refuses a bundle whose
                      templates differ from the running code's)
      base/           only with `package.copy_base: true`; otherwise the manifest references the base
                      generator by its path in the project (models/base/generator, a DVC out of fetch)

A bundle holds data only: JSON, JSONL, safetensors and the retriever's arrays. It never holds code
or pickles, and every load checks every file's hash, whichever generator answers.

Answering (the one answer path: `ragtune serve`, `ragtune ask`, the MLflow model and eval all call it):
route -> maths: prompts.math_prompt -> generator (repetition guard; a box forced when missing) ->
final answer read with metrics.math_answer; reading: retriever top-k -> prompts.cmrc_prompt (passages
dropped or cut to fit the model's context) -> generator; the abstention reply is flagged. A reading
question whose retrieval confidence is below the bundle's calibrated `min_confidence` gets the
abstention reply without generating (ragtune.abstention).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from ragtune import prompts
from ragtune.abstention import RetrievalConfidence, retrieve_excluding
from ragtune.config import Config, UserError, validate
from ragtune.inference import Completion
from ragtune.io import DataError, atomic_dir, read_json, sha256_file
from ragtune.metrics import math_answer
from ragtune.records import read_kb
from ragtune.router import MATHS, READING, UnknownLabel, load_router

FORMAT = 2
MANIFEST = "manifest.json"
BASE_ENV = "RAGTUNE_BASE_GENERATOR"  # overrides where the base generator is found
FORCED_BOX_TOKENS = 12  # the final answer after prompts.FORCE_BOX


class AnswerSettings(Config):
    """How a bundle answers; written into its manifest by package and checked when a bundle loads."""

    top_k: int = Field(ge=1, le=20, description="passages retrieved per reading question (retrieval.top_k)")
    max_new_tokens_maths: int = Field(ge=1, description="token budget of a maths answer (chain of thought, then the box)")
    max_new_tokens_reading: int = Field(ge=1, description="token budget of a reading answer")
    unknown_route: Literal["reading", "error"] = Field(
        description="what an unrecognised router label becomes: reading (with a note) or an error; never maths")
    repeat_window: int = Field(ge=0, description="repetition guard: stop when the last N new tokens repeat a unit "
                                                 "of at most N/3 tokens (0: off)")
    force_box: bool = Field(description="a maths answer that ends without \\\\boxed{} gets one: the model writes the "
                                        "number after 'The final answer is \\\\boxed{'")
    min_confidence: float | None = Field(None, ge=0, description="a reading question whose retrieval confidence "
                                         "(ragtune.abstention) is below this gets prompts.NO_ANSWER without generating; "
                                         "null: never (package calibrates it)")


class PackageConfig(Config):
    """`package` (conf/package/default.yaml): the bundles. Passages per question are `retrieval.top_k`."""

    max_new_tokens_maths: int = Field(384, ge=1, description="chain of thought, then \\\\boxed{answer}")
    max_new_tokens_reading: int = Field(96, ge=1, description="CMRC answers are short spans")
    unknown_route: Literal["reading", "error"] = Field(
        READING, description="an unrecognised router label: reading (with a note) or error; never maths")
    repeat_window: int = Field(48, ge=0, description="repetition guard window in tokens (0: off)")
    force_box: bool = Field(True, description="give a maths answer without \\\\boxed{} one (the model writes the number)")
    copy_base: bool = Field(
        False, description="copy the base generator into the bundle (standalone folder) instead of referencing models/base/generator")
    abstain_answerable_share: float | None = Field(
        0.03, ge=0, le=0.5, description="the retrieval-confidence gate abstains on at most this share of the training "
                                        "reading questions (the threshold is calibrated on them); null: no gate")

    def answer_settings(self, top_k: int, min_confidence: float | None = None) -> AnswerSettings:
        return AnswerSettings(top_k=top_k, min_confidence=min_confidence,
                              **self.model_dump(exclude={"copy_base", "abstain_answerable_share"}))


class PromptTooLong(UserError, ValueError):
    """A question that does not fit the model's context even without passages."""


def prompt_templates() -> dict[str, str]:
    return {"cmrc": prompts.CMRC_TEMPLATE, "maths": prompts.MATH_TEMPLATE, "no_answer": prompts.NO_ANSWER,
            "force_box": prompts.FORCE_BOX}


def folder_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def tree_digest(hashes: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- building


def build_bundle(
    out_dir: str | os.PathLike,
    *,
    kb_path: str | os.PathLike,
    base_dir: str | os.PathLike,
    router_dir: str | os.PathLike,
    retriever: Any,
    answer: AnswerSettings,
    router_metrics_path: str | os.PathLike | None = None,
    copy_base: bool = False,
    project_root: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write a base bundle (no adapter) atomically; `retriever` is the built served retriever over the
    KB's chunks. Returns its manifest."""
    out_dir, kb_path, base_dir = Path(out_dir), Path(kb_path), Path(base_dir)
    if not (base_dir / "config.json").exists():
        raise DataError(f"{base_dir}: no config.json (not a generator checkpoint)")
    if not (Path(router_dir) / "router.json").exists():
        raise DataError(f"{router_dir}: no router.json (run the router stage)")
    chunks = read_kb(kb_path)
    if list(retriever.chunk_ids) != [c.chunk_id for c in chunks]:
        raise DataError(f"{kb_path}: the retriever indexes other chunks than this knowledge base")
    with atomic_dir(out_dir) as tmp:
        shutil.copyfile(kb_path, tmp / "kb.jsonl")
        retriever.save(tmp / "index")
        shutil.copytree(router_dir, tmp / "router")
        (tmp / "prompts.json").write_text(json.dumps(prompt_templates(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        base_hashes = folder_hashes(base_dir)
        if copy_base:
            shutil.copytree(base_dir, tmp / "base")
        manifest = {
            "format": FORMAT,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "answer": answer.model_dump(),
            "retriever": getattr(retriever, "kind", "unknown"),
            "base_generator": {
                "path": "base" if copy_base else _relative(base_dir, Path(project_root or out_dir.resolve().parent)),
                "copied": copy_base,
                "digest": tree_digest(base_hashes),
                "files": {name: {"sha256": h, "bytes": (base_dir / name).stat().st_size} for name, h in base_hashes.items()},
            },
            "adapter": None,
            "kb": {"chunks": len(chunks)},
            "router_metrics": (
                {k: v for k, v in read_json(router_metrics_path).items() if k != "errors"}
                if router_metrics_path and Path(router_metrics_path).exists() else None
            ),
        }
        _seal(tmp, manifest)
    return manifest


def add_adapter(base_bundle: str | os.PathLike, out_dir: str | os.PathLike, adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """The tuned bundle: the base bundle's files, unchanged, plus the LoRA adapter. Returns its manifest."""
    base_bundle, adapter_dir = Path(base_bundle), Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise DataError(f"{adapter_dir}: no adapter_config.json (not a peft adapter)")
    manifest = read_json(base_bundle / MANIFEST)
    with atomic_dir(out_dir) as tmp:
        shutil.copytree(base_bundle, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MANIFEST))
        shutil.copytree(adapter_dir, tmp / "adapter")
        manifest = dict(manifest, adapter="adapter", created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        _seal(tmp, manifest)
    return manifest


def _relative(base_dir: Path, root: Path) -> str:
    try:
        return os.path.relpath(base_dir.resolve(), root.resolve())
    except ValueError:  # another drive: keep it absolute
        return str(base_dir.resolve())


def _seal(folder: Path, manifest: dict[str, Any]) -> None:
    """Hash every file (a copied base is hashed under base_generator) and write the manifest."""
    manifest["files"] = {k: v for k, v in folder_hashes(folder).items() if not k.startswith("base/") and k != MANIFEST}
    manifest["digest"] = tree_digest(manifest["files"] | {"base": manifest["base_generator"]["digest"]})
    (folder / MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- loading and checking


def read_manifest(folder: Path) -> dict[str, Any]:
    manifest = read_json(folder / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise DataError(f"{folder / MANIFEST}: bundle format {found!r}, expected {FORMAT} (rebuild it: dvc repro package)")
    return manifest


def resolve_base(folder: Path, manifest: dict[str, Any], base_dir: str | os.PathLike | None = None) -> Path:
    """Where the base generator is: the argument, $RAGTUNE_BASE_GENERATOR, the bundle's own copy,
    or the manifest's path relative to the project (the bundle's parent) or to the working directory."""
    ref = manifest["base_generator"]["path"]
    candidates = [base_dir, os.environ.get(BASE_ENV)] if base_dir or os.environ.get(BASE_ENV) else []
    candidates += [folder / ref, folder.parent / ref, Path.cwd() / ref]
    for candidate in candidates:
        if candidate and (Path(candidate) / "config.json").exists():
            return Path(candidate)
    raise DataError(f"{folder / MANIFEST}: base generator '{ref}' not found (run `dvc pull`, or set {BASE_ENV})")


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists has its hash, no other file is there, and the prompt templates
    are the running code's."""
    listed = manifest["files"]
    present = {k for k in folder_hashes(folder) if not k.startswith("base/") and k != MANIFEST}
    if extra := sorted(present - set(listed)):
        raise DataError(f"{folder}: {extra[0]} is not in the manifest (a bundle holds only the files it lists)")
    for name, digest in listed.items():
        path = folder / name
        if not path.exists():
            raise DataError(f"{folder}: {name} missing (manifest lists it)")
        if sha256_file(path) != digest:
            raise DataError(f"{folder}: {name} differs from the manifest's hash")
    if read_json(folder / "prompts.json") != prompt_templates():
        raise DataError(f"{folder}/prompts.json: the bundle's prompt templates differ from ragtune.prompts")


def verify_base(base: Path, manifest: dict[str, Any], full: bool = False) -> None:
    """The base generator's files have the sizes (with `full`, the hashes) the bundle was built with."""
    for name, info in manifest["base_generator"]["files"].items():
        path = base / name
        if not path.exists() or path.stat().st_size != info["bytes"]:
            raise DataError(f"{base}: {name} missing or of another size than the bundle was built with")
        if full and sha256_file(path) != info["sha256"]:
            raise DataError(f"{base}: {name} differs from the hash the bundle was built with")


def checked_base(folder: str | os.PathLike, verify: str = "size", base_dir: str | os.PathLike | None = None) -> Path:
    """The bundle's base generator folder, after checking the bundle and the base (for an engine such as
    vLLM that loads the base itself)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    base = resolve_base(folder, manifest, base_dir)
    if verify != "none":
        verify_files(folder, manifest)
        verify_base(base, manifest, full=verify == "full")
    return base


@dataclass
class Prepared:
    """A routed question, ready for the generator."""

    question: str
    route: str
    user_text: str
    max_new_tokens: int
    sources: list[dict[str, Any]] = field(default_factory=list)
    route_note: str | None = None
    context_note: str | None = None
    budget_asked: bool = False  # the caller set max_new_tokens: it bounds the answer, no box is forced past it
    abstain: bool = False  # the retrieval-confidence gate closed: the answer is prompts.NO_ANSWER, nothing is generated


class Bundle:
    """A loaded bundle: `answer(question)` -> {answer, route, sources, text, abstained, ...}."""

    def __init__(self, folder: Path, manifest: dict[str, Any], router: Any, index: Any,
                 chunks: dict[str, Any], generator: Any, tokenizer: Any, max_positions: int):
        self.folder, self.manifest, self.router, self.index = folder, manifest, router, index
        self.chunks, self.generator = chunks, generator
        self.tokenizer, self.max_positions = tokenizer, max_positions
        self.settings = validate(AnswerSettings, manifest.get("answer"), prefix=("manifest.json: answer",))
        self.confidence = RetrievalConfidence(index, {cid: c.article_id for cid, c in chunks.items()})

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike,
        generator: Any = None,
        base_dir: str | os.PathLike | None = None,
        verify: str = "size",
        *,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 8,
    ) -> Bundle:
        """Load a bundle. Its files are checked against the manifest on every path (`verify`: 'size'
        checks the base generator's sizes, 'full' its hashes too, 'none' nothing: for tests only);
        `generator` replaces the in-process model (e.g. an OpenAIGenerator talking to vLLM)."""
        from transformers import AutoConfig, AutoTokenizer

        from ragtune.retrieval import load_retriever

        folder = Path(folder)
        manifest = read_manifest(folder)
        base = resolve_base(folder, manifest, base_dir)
        if verify != "none":
            verify_files(folder, manifest)
            verify_base(base, manifest, full=verify == "full")
        settings = validate(AnswerSettings, manifest.get("answer"), prefix=("manifest.json: answer",))
        if generator is None:
            from ragtune.inference import TransformersGenerator

            adapter = folder / manifest["adapter"] if manifest.get("adapter") else None
            generator = TransformersGenerator(base, adapter, batch_size=batch_size, dtype=dtype, device=device,
                                              repeat_window=settings.repeat_window)
        tokenizer = getattr(generator, "tokenizer", None) or AutoTokenizer.from_pretrained(base)
        max_positions = int(getattr(AutoConfig.from_pretrained(base), "max_position_embeddings", 2048))
        chunks = {c.chunk_id: c for c in read_kb(folder / "kb.jsonl")}
        return cls(folder, manifest, load_router(folder / "router"), load_retriever(folder / "index", device=device),
                   chunks, generator, tokenizer, max_positions)

    @property
    def name(self) -> str:
        return "ragtune"

    # ------------------------------------------------------------------ routing and prompts

    def route(self, question: str) -> tuple[str, str | None]:
        """(route, note): a label the router does not know, or an unreachable llm router, takes
        `unknown_route` (reading by default) and says so in the note; it never becomes maths."""
        try:
            return self.router.route_many([question])[0], None
        except UnknownLabel as err:
            return self._unknown(err)
        except Exception as err:
            if getattr(self.router, "kind", None) != "llm":
                raise
            return self._unknown(err)

    def _unknown(self, err: Exception) -> tuple[str, str | None]:
        if self.settings.unknown_route == "error":
            raise err
        return self.settings.unknown_route, f"router failed ({err}); answered as {self.settings.unknown_route}"

    def _prompt_tokens(self, user_text: str) -> int:
        return len(self.tokenizer(prompts.apply_chat_template(self.tokenizer, user_text), add_special_tokens=False)["input_ids"])

    def _fit(self, question: str, passages: list[str], budget: int) -> tuple[str, int, str | None]:
        """The reading prompt with as many passages, best first, as fit the model's context next to
        the answer's budget; the last kept passage is cut when even one does not fit whole.
        Returns (prompt, passages kept, note)."""
        limit = self.max_positions - budget
        if limit <= 0:
            raise PromptTooLong(f"max_tokens {budget} leaves no room for a prompt in the model's {self.max_positions} positions")
        if not passages:  # nothing in the KB matched (e.g. "hi"): the model sees an empty context
            text = prompts.cmrc_prompt("", question)
            if self._prompt_tokens(text) > limit:
                raise PromptTooLong(f"the question does not fit the model's {self.max_positions} positions next to a "
                                    f"{budget}-token answer")
            return text, 0, "no passage in the knowledge base matched the question"
        kept = list(passages)
        while kept:
            text = prompts.cmrc_prompt(prompts.join_passages(kept), question)
            if self._prompt_tokens(text) <= limit:
                note = None if len(kept) == len(passages) else f"{len(passages) - len(kept)} passages left out to fit the context"
                return text, len(kept), note
            if len(kept) == 1:
                break
            kept.pop()
        if self._prompt_tokens(prompts.cmrc_prompt("", question)) > limit:
            raise PromptTooLong(f"the question does not fit the model's {self.max_positions} positions next to a "
                                f"{budget}-token answer")
        lo, hi, passage = 0, len(kept[0]), kept[0]
        while lo < hi:  # the longest head of the first passage that fits
            mid = (lo + hi + 1) // 2
            if self._prompt_tokens(prompts.cmrc_prompt(passage[:mid], question)) <= limit:
                lo = mid
            else:
                hi = mid - 1
        return prompts.cmrc_prompt(passage[:lo], question), 1, "the first passage was cut to fit the context"

    def _retrieve(self, question: str, k: int, exclude_articles: set[str] | None) -> list[tuple[str, float]]:
        return retrieve_excluding(self.index, self.confidence.article_of, [question], k, exclude_articles)[0]

    def prepare(self, question: str, top_k: int | None = None, max_new_tokens: int | None = None,
                exclude_articles: set[str] | None = None) -> Prepared:
        """Route, retrieve (leaving out `exclude_articles`: eval's unanswerable questions) and build the prompt."""
        route, note = self.route(question)
        if route == MATHS:
            budget = int(max_new_tokens or self.settings.max_new_tokens_maths)
            user_text = prompts.math_prompt(question)
            if self._prompt_tokens(user_text) > self.max_positions - budget:
                raise PromptTooLong(f"the question does not fit the model's {self.max_positions} positions")
            return Prepared(question, route, user_text, budget, route_note=note, budget_asked=max_new_tokens is not None)
        hits = self._retrieve(question, int(top_k or self.settings.top_k), exclude_articles)
        sources = [{"chunk_id": cid, "title": self.chunks[cid].title, "text": self.chunks[cid].text,
                    "score": round(score, 4)} for cid, score in hits]
        threshold = self.settings.min_confidence
        if threshold is not None:
            confidence = self.confidence.confidence(question, hits, exclude_articles)
            if confidence < threshold:
                gate_note = (f"retrieval confidence {confidence:.3f} is below the bundle's {threshold:.3f}: "
                             "the knowledge base does not seem to answer this")
                return Prepared(question, READING, "", int(max_new_tokens or self.settings.max_new_tokens_reading),
                                sources, note, gate_note, max_new_tokens is not None, abstain=True)
        return self._reading(question, sources, max_new_tokens, route_note=note)

    def prepare_with_passages(self, question: str, passages: Sequence[str], max_new_tokens: int | None = None) -> Prepared:
        """A reading prompt over the given passages (eval's gold-context diagnostic: the generator without
        router and retriever), in the same template, budget and context limit as served answers."""
        return self._reading(question, [{"chunk_id": None, "title": "", "text": t, "score": None} for t in passages],
                             max_new_tokens)

    def _reading(self, question: str, sources: list[dict[str, Any]], max_new_tokens: int | None,
                 route_note: str | None = None) -> Prepared:
        budget = int(max_new_tokens or self.settings.max_new_tokens_reading)
        user_text, kept, context_note = self._fit(question, [s["text"] for s in sources], budget)
        return Prepared(question, READING, user_text, budget, sources[:kept], route_note, context_note,
                        max_new_tokens is not None)

    # ------------------------------------------------------------------ answering

    def finish(self, prepared: Prepared, text: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        result = {"question": prepared.question, "route": prepared.route, "text": text, "sources": prepared.sources}
        if usage:
            result["usage"] = usage
        if prepared.route == MATHS:
            value, how = math_answer(text)
            result.update(answer=value if value is not None else text, final_answer=value, extraction=how,
                          abstained=False)
        else:
            result.update(answer=text, final_answer=text, abstained=prompts.is_abstention(text))
        for key in ("route_note", "context_note"):
            if getattr(prepared, key):
                result[key] = getattr(prepared, key)
        return result

    def generate(self, prepared: Sequence[Prepared]) -> list[Completion]:
        """One batched generate call per route and token budget (short maths prompts never wait in a
        batch padded to a reading prompt's passages), then the forced boxes."""
        done: list[Any] = [Completion(prompts.NO_ANSWER) if p.abstain else None for p in prepared]
        for route, budget in sorted({(p.route, p.max_new_tokens) for p in prepared if not p.abstain}):
            idx = [i for i, p in enumerate(prepared) if not p.abstain and (p.route, p.max_new_tokens) == (route, budget)]
            for i, completion in zip(idx, self._complete([prepared[i].user_text for i in idx], budget), strict=True):
                done[i] = completion
        if self.settings.force_box:
            self._force_boxes(prepared, done)
        return done

    def _complete(self, user_texts: list[str], budget: int, prefixes: list[str] | None = None) -> list[Completion]:
        if hasattr(self.generator, "generate_detailed"):
            return self.generator.generate_detailed(user_texts, budget, prefixes) if prefixes else \
                self.generator.generate_detailed(user_texts, budget)
        return [Completion(t) for t in self.generator.generate(user_texts, budget)]

    def _force_boxes(self, prepared: Sequence[Prepared], done: list[Completion]) -> None:
        """Maths answers without a box continue after prompts.FORCE_BOX for a few tokens, up to '}' (not
        past a budget the caller asked for)."""
        idx = [i for i, p in enumerate(prepared)
               if p.route == MATHS and not p.budget_asked and "\\boxed{" not in done[i].text]
        if not idx or not hasattr(self.generator, "generate_detailed"):
            return
        prefixes = [done[i].text.rstrip() + prompts.FORCE_BOX for i in idx]
        forced = self._complete([prepared[i].user_text for i in idx], FORCED_BOX_TOKENS, prefixes)
        for i, prefix, extra in zip(idx, prefixes, forced, strict=True):
            done[i].text = prefix.lstrip() + extra.text.split("}")[0].strip() + "}"
            done[i].completion_tokens += extra.completion_tokens
            done[i].forced_box = True

    def answer_many(self, questions: Sequence[str], top_k: int | None = None, max_new_tokens: int | None = None,
                    exclude_articles: Sequence[set[str] | None] | None = None) -> list[dict[str, Any]]:
        excluded = exclude_articles or [None] * len(questions)
        prepared = [self.prepare(q, top_k, max_new_tokens, ex) for q, ex in zip(questions, excluded, strict=True)]
        return self.answer_prepared(prepared)

    def answer_prepared(self, prepared: Sequence[Prepared]) -> list[dict[str, Any]]:
        return [self.finish(p, c.text, usage_of(c)) for p, c in zip(prepared, self.generate(prepared), strict=True)]

    def answer(self, question: str, top_k: int | None = None, max_new_tokens: int | None = None) -> dict[str, Any]:
        return self.answer_many([question], top_k, max_new_tokens)[0]

    def stream(self, prepared: Prepared, cancel: Any = None, stats: dict[str, Any] | None = None) -> Iterator[str]:
        """The generator's text for a prepared question, piece by piece, ending like `generate`'s (a
        forced box included); `cancel` (a threading.Event) stops it early, `stats` receives token
        counts and the finish reason."""
        if prepared.abstain:
            yield prompts.NO_ANSWER
            return
        if not hasattr(self.generator, "stream"):
            yield self._complete([prepared.user_text], prepared.max_new_tokens)[0].text
            return
        pieces = []
        for piece in self.generator.stream(prepared.user_text, prepared.max_new_tokens, cancel=cancel, stats=stats):
            pieces.append(piece)
            yield piece
        text = "".join(pieces)
        if (prepared.route == MATHS and self.settings.force_box and not prepared.budget_asked
                and "\\boxed{" not in text and not (cancel is not None and cancel.is_set())):
            prefix = text.rstrip() + prompts.FORCE_BOX
            extra = self._complete([prepared.user_text], FORCED_BOX_TOKENS, [prefix])[0]
            if stats is not None:
                stats["completion_tokens"] = stats.get("completion_tokens", 0) + extra.completion_tokens
            yield prefix[len(text):] + extra.text.split("}")[0].strip() + "}"


def usage_of(completion: Completion) -> dict[str, Any]:
    """Token counts and finish reason of a Completion: the same keys a stream's `stats` receives."""
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "finish_reason": completion.finish_reason,
    }


def log_pyfunc_model(mlflow: Any, bundle_dir: str | os.PathLike, base_dir: str | os.PathLike | None = None,
                     name: str = "bundle_model", max_new_tokens: int | None = None) -> Any:
    """Log the bundle to the active MLflow run as a pyfunc model from code (ragtune/pyfunc_model.py)."""
    from importlib.metadata import PackageNotFoundError, version

    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    requirements = []
    for package in ("mlflow", "torch", "transformers", "peft", "bm25s", "jieba", "scikit-learn", "pandas", "pydantic"):
        try:
            requirements.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            requirements.append(package)
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "question")]),
        outputs=Schema([ColSpec("string", c) for c in ("answer", "route", "sources", "text")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 0)]),
    )
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(Path(__file__).with_name("pyfunc_model.py")),
        artifacts={"bundle": str(bundle_dir)},
        code_paths=[str(Path(__file__).parent)],
        model_config={"base_dir": str(Path(base_dir).resolve()) if base_dir else "", "max_new_tokens": max_new_tokens},
        signature=signature,
        pip_requirements=requirements,
    )
