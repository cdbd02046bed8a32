"""A small bundle for the serve, browser and bundle tests: the real base generator, a 40-chunk
knowledge base (short prompts) and a router fitted in a second on a sample of the train questions."""

from __future__ import annotations

import json
from pathlib import Path

from ragtune.bundle import AnswerSettings, add_adapter, build_bundle
from ragtune.records import read_kb
from ragtune.retrieval import BM25Index
from ragtune.data import Report, load_cmrc, load_gsm8k, seeded_sample
from ragtune.router import MATHS, READING, ClassifierRouter, synthetic_questions

READING_QUESTION = "《战国无双3》是由哪两个公司合作开发的？"
MATHS_QUESTION = "Tom has 3 apples and buys 5 more. How many apples does he have now?"
TINY_ANSWER = AnswerSettings(max_new_tokens_maths=6, max_new_tokens_reading=6, top_k=3, unknown_route="reading",
                             repeat_window=48, force_box=True)


def small_kb(mirror: Path, out: Path, articles: int = 12) -> Path:
    rows = []
    for article in load_cmrc(mirror / "cmrc2018" / "cmrc2018_dev.json", Report())[:articles]:
        for i in range(0, min(len(article.context), 180), 60):
            rows.append({"chunk_id": f"{article.id}-{i // 60}", "article_id": article.id, "title": article.title,
                         "text": article.context[i : i + 60]})
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return out


def small_router(mirror: Path, out: Path) -> Path:
    gsm = [r["question"] for r in load_gsm8k(mirror / "gsm8k" / "train.jsonl", "train")]
    cmrc = [q.question for a in load_cmrc(mirror / "cmrc2018" / "cmrc2018_dev.json", Report()) for q in a.questions]
    pairs = [(q, MATHS) for q in seeded_sample(gsm, 400, 0)] + [(q, READING) for q in seeded_sample(cmrc, 400, 0)]
    ClassifierRouter.fit(pairs + synthetic_questions(200, seed=0), seed=0, ngram_max=4, c=10.0).save(out)
    return out


def build_small_bundle(mirror: Path, base_generator: Path, folder: Path, adapter: Path | None = None,
                       answer: AnswerSettings = TINY_ANSWER) -> Path:
    """A base bundle over a small KB, or with `adapter` the tuned bundle made from it (as package does)."""
    folder.mkdir(parents=True, exist_ok=True)
    kb = small_kb(mirror, folder / "kb.jsonl")
    router = small_router(mirror, folder / "router")
    chunks = read_kb(kb)
    retriever = BM25Index([c.chunk_id for c in chunks], [c.text for c in chunks])
    base_bundle = folder / "bundle_base"
    build_bundle(base_bundle, kb_path=kb, base_dir=base_generator, router_dir=router, retriever=retriever, answer=answer)
    if adapter is None:
        return base_bundle
    add_adapter(base_bundle, folder / "bundle", adapter)
    return folder / "bundle"


def tiny_adapter(base_generator: Path, out: Path, seed: int = 0) -> Path:
    """A LoRA adapter for the base generator with random (non-zero) weights: a stand-in for sft's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_generator, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    peft_model.save_pretrained(str(out))
    return out
