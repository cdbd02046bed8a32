"""sft: LoRA fine-tune of the base generator on CMRC, each context built as the served path builds it
(ragtune.raft), plus the distilled maths chain of thought when distill has built it."""

import os
import sys
from pathlib import Path

import ragtune.data
import ragtune.prompts
import ragtune.raft
import ragtune.training
from ragtune.config import read_params, run_stage, stage_parser
from ragtune.devices import pin_training_gpu, placement, resolve_device
from ragtune.io import DataError, atomic_dir, write_json
from ragtune.models import EmbedderConfig, ModelConfig
from ragtune.prompts import apply_chat_template
from ragtune.raft import build_contexts
from ragtune.records import CMRC_TRAIN, DISTILLED, KB, ReadingQuestion, read_alpaca, read_kb, read_records
from ragtune.retrieval import RetrievalConfig, build_retriever
from ragtune.tracking import log_model_dir, log_step_metrics, stage_run
from ragtune.training import (
    SftConfig,
    check_quantization,
    curve_rows,
    exit_with_launcher,
    fingerprint,
    mix_sources,
    relaunch_under_accelerate,
    split_validation,
    train_lora,
    under_accelerate,
    write_curves_tsv,
)

BASE = Path("models/base/generator")
EMBED_FT = Path("models/embed_ft")  # the tuned embedder: the served retriever when it is dense or hybrid
ADAPTER = Path("models/sft/adapter")
CHECKPOINTS = Path("models/sft/checkpoints")
REPORTS = Path("reports/sft")
ANSWER_ROOM = 64  # tokens kept free for the answer when passages are fitted into cutoff_len


def cmrc_records(cfg: SftConfig, retrieval: RetrievalConfig, query_prompt: str, seed: int, device: str):
    """One Alpaca record per CMRC train question, its context built by ragtune.raft over the train
    articles' chunks (eval articles never appear in training prompts)."""
    from transformers import AutoTokenizer

    questions = read_records(CMRC_TRAIN, ReadingQuestion)
    if not questions:  # your own data without reading questions: the maths CoT alone
        print(f"sft: no reading questions in {CMRC_TRAIN}; training on the distilled maths alone", flush=True)
        return [], {}
    articles = {q.article_id for q in questions}
    chunks = [c for c in read_kb(KB) if c.article_id in articles]
    retriever = None
    if cfg.contexts.kind == "retrieved":
        embedder = None if retrieval.kind == "bm25" else str(EMBED_FT)
        retriever = build_retriever(retrieval, chunks,
                                    embedder=embedder, query_prompt=query_prompt, device=device)
    tokenizer = AutoTokenizer.from_pretrained(BASE)

    def fits(prompt: str) -> bool:
        tokens = tokenizer(apply_chat_template(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        return len(tokens) + ANSWER_ROOM <= cfg.cutoff_len

    return build_contexts(questions, chunks, cfg.contexts, retriever=retriever,
                          top_k=cfg.contexts.top_k or retrieval.top_k, seed=seed, fits=fits)


def main() -> None:
    args = stage_parser(__doc__).parse_args()
    params = read_params(args.params)
    cfg, common = params.group("sft", SftConfig), params.common()
    retrieval = params.group("retrieval", RetrievalConfig)
    lr, seed, targets = common.lr, common.seed, params.group("model", ModelConfig).lora_targets

    if cfg.launcher == "accelerate" and not under_accelerate():
        check_quantization(cfg.quantization, resolve_device(common.device))  # at once, not in every rank
        sys.exit(relaunch_under_accelerate("sft", cfg.accelerate_config, __file__, sys.argv[1:]))
    if under_accelerate():
        exit_with_launcher("sft")
    is_main = int(os.environ.get("RANK", "0")) == 0
    # one GPU for a single process (before anything asks CUDA), then the placement
    device, dtype = placement(pin_training_gpu(common.device), common.dtype)
    check_quantization(cfg.quantization, device)  # 4bit without CUDA: one line, before loading anything

    cmrc, built = cmrc_records(cfg, retrieval, params.group("embedder", EmbedderConfig).query_prompt, seed, device)
    sources = {"cmrc": [r.model_dump() for r in cmrc], "distilled": [r.model_dump() for r in read_alpaca(DISTILLED, required=False)]}
    if not sources["distilled"]:
        print(f"sft: {DISTILLED} is missing or empty; training on CMRC alone", flush=True)
    if not sources["cmrc"] and not sources["distilled"]:
        raise DataError(f"nothing to train on: {CMRC_TRAIN} has no reading questions and "
                        f"{DISTILLED} no distilled maths (see distill's message)")
    records, counts = mix_sources(sources, cfg.mix.model_dump(), total=cfg.max_samples, seed=seed)
    train, val = split_validation(records, cfg.val_size, seed)
    print(f"sft: {len(train)} train / {len(val)} val records, from {counts}; contexts {dict(built)}; {device}, {dtype}",
          flush=True)

    settings = {"sft": cfg.model_dump(), "lr": lr, "seed": seed, "lora_targets": targets, "dtype": dtype,
                "retrieval": retrieval.model_dump()}
    # The code that shapes training is part of what a checkpoint was made from: after a change
    # to it, DVC reruns sft and resuming an old run's final checkpoint would skip the new code.
    code = [Path(__file__), *(Path(m.__file__) for m in (ragtune.training, ragtune.prompts, ragtune.data, ragtune.raft))]
    inputs = [BASE / "model.safetensors", CMRC_TRAIN, KB, DISTILLED, EMBED_FT / "model.safetensors"]
    run_fingerprint = fingerprint(settings, [*inputs, *code])
    training = {"base_model_dir": BASE, "train_records": train, "val_records": val, "cfg": cfg, "lr": lr,
                "seed": seed, "lora_targets": targets, "checkpoint_dir": CHECKPOINTS,
                "run_fingerprint": run_fingerprint, "device": device, "dtype": dtype}
    if not is_main:  # other accelerate processes train alongside; the main one writes and logs
        train_lora(adapter_dir=None, **training)
        return
    tracked = {"sft": cfg.model_dump(), "lr": lr, "seed": seed, "model": {"lora_targets": targets},
               "retrieval": retrieval.model_dump(), "device": device, "dtype": dtype}
    with stage_run("sft", tracked) as mlflow:
        with atomic_dir(ADAPTER) as adapter_tmp:
            result = train_lora(adapter_dir=adapter_tmp, **training)
            metrics = result["metrics"] | {f"records_{name}": n for name, n in counts.items()}
            metrics |= {f"contexts_{kind}": n for kind, n in sorted(built.items())}
            curves = curve_rows(result["log_history"])
            write_curves_tsv(REPORTS / "curves.tsv", curves)
            write_json(REPORTS / "metrics.json", metrics)
        log_step_metrics(curves)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None})
        mlflow.log_artifact(str(REPORTS / "curves.tsv"))
        log_model_dir(ADAPTER, name="sft-adapter", model_type="peft-lora", params={"lr": lr, "lora_targets": targets})
        print(f"sft: adapter in {ADAPTER}; {metrics}", flush=True)


if __name__ == "__main__":
    run_stage("sft", main)
