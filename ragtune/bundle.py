"""The RAG bundle: everything `ragtune serve` needs to answer, in one folder, and the answering itself.

    bundle/
      manifest.json   content hashes of every file below and of the base generator, answer settings,
                      the eval and router metrics the bundle was measured at
      kb.jsonl        the knowledge base (chunk_id, article_id, title, text)
      index/          its BM25 index (ragtune.retrieval, saved)
      router/         the maths/reading router (ragtune.router, saved)
      adapter/        the LoRA adapter (absent when the bundle serves the base model)
      prompts.json    the prompt templates the bundle was built with (the code uses ragtune.prompts;
                      loading refuses a bundle whose templates differ from the running code's)
      base/           only with `package.copy_base: true`; otherwise the manifest references the base
                      generator by its path in the project (models/base/generator, a DVC out of fetch)
                      and its hashes, so `dvc pull` brings both and the bundle stays a few MB.

Answering: maths -> generator on prompts.math_prompt, final answer read with metrics.math_answer;
reading -> BM25 top-k passages -> prompts.cmrc_prompt -> generator.
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
from ragtune.config import Config, validate
from ragtune.inference import Completion
from ragtune.io import DataError, atomic_dir, iter_jsonl, read_json, require, sha256_file
from ragtune.metrics import math_answer
from ragtune.router import MATHS, READING, UnknownLabel, load_router

FORMAT = 1
MANIFEST = "manifest.json"
BASE_ENV = "RAGTUNE_BASE_GENERATOR"  # overrides where the base generator is found


class AnswerSettings(Config):
    """How a bundle answers; written into its manifest by package and checked when a bundle loads."""

    top_k: int = Field(ge=1, le=20, description="passages retrieved per reading question (retrieval.top_k)")
    max_new_tokens_maths: int = Field(ge=1, description="token budget of a maths answer (chain of thought, then the box)")
    max_new_tokens_reading: int = Field(ge=1, description="token budget of a reading answer")
    unknown_route: Literal["reading", "error"] = Field(
        description="what an unrecognised router label becomes: reading (with a note) or an error; never maths")


class PackageConfig(Config):
    """`package` (conf/package/default.yaml): the bundle. Passages per question are `retrieval.top_k`."""

    max_new_tokens_maths: int = Field(384, ge=1, description="chain of thought, then \\boxed{answer}")
    max_new_tokens_reading: int = Field(96, ge=1, description="CMRC answers are short spans")
    unknown_route: Literal["reading", "error"] = Field(
        READING, description="an unrecognised router label: reading (with a note) or error; never maths")
    copy_base: bool = Field(
        False, description="copy the base generator into bundle/base (standalone folder) instead of referencing models/base/generator")
    log_model: bool = Field(True, description="also log the bundle to MLflow as a pyfunc model")

    def answer_settings(self, top_k: int) -> AnswerSettings:
        return AnswerSettings(top_k=top_k, max_new_tokens_maths=self.max_new_tokens_maths,
                              max_new_tokens_reading=self.max_new_tokens_reading, unknown_route=self.unknown_route)


def prompt_templates() -> dict[str, str]:
    return {"cmrc": prompts.CMRC_TEMPLATE, "maths": prompts.MATH_TEMPLATE}


def folder_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {
        str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()
    }


def tree_digest(hashes: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def read_kb(path: Path) -> list[dict[str, Any]]:
    chunks, seen = [], set()
    for lineno, record in iter_jsonl(path):
        require(record, ("chunk_id", "text"), f"{path}:{lineno}")
        if record["chunk_id"] in seen:
            raise DataError(f"{path}:{lineno}: chunk_id '{record['chunk_id']}' repeated")
        seen.add(record["chunk_id"])
        chunks.append(record)
    if not chunks:
        raise DataError(f"{path}: no chunks")
    return chunks


def build_bundle(
    out_dir: str | os.PathLike,
    kb_path: str | os.PathLike,
    base_dir: str | os.PathLike,
    router_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike | None = None,
    metrics_path: str | os.PathLike | None = None,
    router_metrics_path: str | os.PathLike | None = None,
    *,
    answer: AnswerSettings,
    copy_base: bool = False,
    stopwords: Sequence[str] = (),
    project_root: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write the bundle folder atomically; returns its manifest."""
    from ragtune.retrieval import BM25Index

    out_dir, kb_path, base_dir = Path(out_dir), Path(kb_path), Path(base_dir)
    if not (base_dir / "config.json").exists():
        raise DataError(f"{base_dir}: no config.json (not a generator checkpoint)")
    if adapter_dir is not None and not (Path(adapter_dir) / "adapter_config.json").exists():
        raise DataError(f"{adapter_dir}: no adapter_config.json (not a peft adapter)")
    if not (Path(router_dir) / "router.json").exists():
        raise DataError(f"{router_dir}: no router.json (run the router stage)")
    chunks = read_kb(kb_path)

    with atomic_dir(out_dir) as tmp:
        shutil.copyfile(kb_path, tmp / "kb.jsonl")
        BM25Index([c["chunk_id"] for c in chunks], [c["text"] for c in chunks], stopwords).save(tmp / "index")
        shutil.copytree(router_dir, tmp / "router")
        if adapter_dir is not None:
            shutil.copytree(adapter_dir, tmp / "adapter")
        (tmp / "prompts.json").write_text(json.dumps(prompt_templates(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")

        base_hashes = folder_hashes(base_dir)
        if copy_base:
            shutil.copytree(base_dir, tmp / "base")
            base_ref = "base"
        else:
            root = Path(project_root or out_dir.resolve().parent)
            try:
                base_ref = os.path.relpath(base_dir.resolve(), root.resolve())
            except ValueError:  # another drive: keep it absolute
                base_ref = str(base_dir.resolve())
        metrics, metrics_note = None, "no eval metrics given"
        if metrics_path is not None:
            if Path(metrics_path).exists():
                metrics, metrics_note = read_json(metrics_path), str(metrics_path)
            else:
                metrics_note = f"{metrics_path} absent: the bundle was not evaluated"
        manifest = {
            "format": FORMAT,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "answer": answer.model_dump(),
            "base_generator": {
                "path": base_ref,
                "copied": copy_base,
                "digest": tree_digest(base_hashes),
                "files": {name: {"sha256": h, "bytes": (base_dir / name).stat().st_size} for name, h in base_hashes.items()},
            },
            "adapter": "adapter" if adapter_dir is not None else None,
            "kb": {"chunks": len(chunks)},
            "metrics": metrics,
            "metrics_source": metrics_note,
            "router_metrics": (
                {k: v for k, v in read_json(router_metrics_path).items() if k != "errors"}
                if router_metrics_path and Path(router_metrics_path).exists() else None
            ),
        }
        manifest["files"] = {k: v for k, v in folder_hashes(tmp).items() if not k.startswith("base/")}
        manifest["digest"] = tree_digest(manifest["files"] | {"base": manifest["base_generator"]["digest"]})
        (tmp / MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
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
    raise DataError(
        f"{folder / MANIFEST}: base generator '{ref}' not found (run `dvc pull`, or set {BASE_ENV})"
    )


def verify_bundle(folder: Path, manifest: dict[str, Any], base: Path, full: bool = False) -> None:
    """Check the bundle's files against the manifest hashes, and the base generator's sizes (or,
    with `full`, its hashes too: a few seconds for 540 MB)."""
    for name, digest in manifest["files"].items():
        path = folder / name
        if not path.exists():
            raise DataError(f"{folder}: {name} missing (manifest lists it)")
        if sha256_file(path) != digest:
            raise DataError(f"{folder}: {name} differs from the manifest's hash")
    for name, info in manifest["base_generator"]["files"].items():
        path = base / name
        if not path.exists() or path.stat().st_size != info["bytes"]:
            raise DataError(f"{base}: {name} missing or of another size than the bundle was built with")
        if full and sha256_file(path) != info["sha256"]:
            raise DataError(f"{base}: {name} differs from the hash the bundle was built with")
    if read_json(folder / "prompts.json") != prompt_templates():
        raise DataError(f"{folder}/prompts.json: the bundle's prompt templates differ from ragtune.prompts")


@dataclass
class Prepared:
    """A routed question, ready for the generator."""

    question: str
    route: str
    user_text: str
    max_new_tokens: int
    sources: list[dict[str, Any]] = field(default_factory=list)
    route_note: str | None = None


class Bundle:
    """A loaded bundle: `answer(question)` -> {answer, route, sources, text, ...}."""

    def __init__(self, folder: Path, manifest: dict[str, Any], router: Any, index: Any,
                 chunks: dict[str, dict[str, Any]], generator: Any):
        self.folder, self.manifest, self.router, self.index = folder, manifest, router, index
        self.chunks, self.generator = chunks, generator
        self.settings = validate(AnswerSettings, manifest.get("answer"), prefix=("manifest.json: answer",))

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike,
        generator: Any = None,
        base_dir: str | os.PathLike | None = None,
        verify: str = "size",
        generator_cfg: dict[str, Any] | None = None,
    ) -> Bundle:
        """Load a bundle; `generator` replaces the in-process model (e.g. an OpenAIGenerator talking
        to vLLM); `verify` is 'size' (bundle hashes, base sizes), 'full' (base hashes too) or 'none'."""
        from ragtune.retrieval import load_retriever

        folder = Path(folder)
        manifest = read_json(folder / MANIFEST)
        if manifest.get("format") != FORMAT:
            raise DataError(f"{folder / MANIFEST}: bundle format {manifest.get('format')!r}, expected {FORMAT}")
        if generator is None:
            from ragtune.inference import TransformersGenerator

            base = resolve_base(folder, manifest, base_dir)
            if verify != "none":
                verify_bundle(folder, manifest, base, full=verify == "full")
            adapter = folder / manifest["adapter"] if manifest.get("adapter") else None
            generator = TransformersGenerator(base, adapter, **(generator_cfg or {}))
        chunks = {c["chunk_id"]: c for c in read_kb(folder / "kb.jsonl")}
        return cls(folder, manifest, load_router(folder / "router"), load_retriever(folder / "index"), chunks, generator)

    @property
    def name(self) -> str:
        return "ragtune"

    # ------------------------------------------------------------------ answering

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

    def prepare(self, question: str, top_k: int | None = None, max_new_tokens: int | None = None) -> Prepared:
        route, note = self.route(question)
        if route == MATHS:
            return Prepared(question, route, prompts.math_prompt(question),
                            int(max_new_tokens or self.settings.max_new_tokens_maths), route_note=note)
        k = int(top_k or self.settings.top_k)
        hits = self.index.retrieve(question, k)
        sources = [
            {"chunk_id": cid, "title": self.chunks[cid].get("title", ""), "text": self.chunks[cid]["text"], "score": round(score, 4)}
            for cid, score in hits
        ]
        context = "\n".join(s["text"] for s in sources)
        return Prepared(question, route, prompts.cmrc_prompt(context, question),
                        int(max_new_tokens or self.settings.max_new_tokens_reading), sources, note)

    def finish(self, prepared: Prepared, text: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        result = {"question": prepared.question, "route": prepared.route, "text": text, "sources": prepared.sources}
        if usage:
            result["usage"] = usage
        if prepared.route == MATHS:
            value, how = math_answer(text)
            result.update(answer=value if value is not None else text, final_answer=value, extraction=how)
        else:
            result.update(answer=text, final_answer=text)
        if prepared.route_note:
            result["route_note"] = prepared.route_note
        return result

    def answer_many(self, questions: Sequence[str], top_k: int | None = None,
                    max_new_tokens: int | None = None) -> list[dict[str, Any]]:
        prepared = [self.prepare(q, top_k, max_new_tokens) for q in questions]
        done: list[Any] = [None] * len(prepared)
        # One batched call per route and token budget: short maths prompts never wait in a batch
        # padded to a reading prompt's three passages.
        for route, budget in sorted({(p.route, p.max_new_tokens) for p in prepared}):
            idx = [i for i, p in enumerate(prepared) if (p.route, p.max_new_tokens) == (route, budget)]
            texts = [prepared[i].user_text for i in idx]
            if hasattr(self.generator, "generate_detailed"):
                completions = self.generator.generate_detailed(texts, budget)
            else:
                completions = [Completion(t) for t in self.generator.generate(texts, budget)]
            for i, completion in zip(idx, completions, strict=True):
                done[i] = completion
        return [self.finish(p, c.text, usage_of(c)) for p, c in zip(prepared, done, strict=True)]

    def answer(self, question: str, top_k: int | None = None, max_new_tokens: int | None = None) -> dict[str, Any]:
        return self.answer_many([question], top_k, max_new_tokens)[0]

    def stream(self, prepared: Prepared, cancel: Any = None, stats: dict[str, Any] | None = None) -> Iterator[str]:
        """The generator's text for a prepared question, piece by piece; `cancel` (a threading.Event)
        stops it early, `stats` receives token counts and the finish reason."""
        if hasattr(self.generator, "stream"):
            yield from self.generator.stream(prepared.user_text, prepared.max_new_tokens, cancel=cancel, stats=stats)
        else:
            yield self.generator.generate([prepared.user_text], prepared.max_new_tokens)[0]


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
    for package in ("mlflow", "torch", "transformers", "peft", "bm25s", "jieba", "scikit-learn", "pandas"):
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
