"""Supervised fine-tuning: Alpaca records -> chat-template features (loss on the answer only) ->
a LoRA adapter trained with transformers' Trainer and peft, resumable from its checkpoints."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ragtune.config import Config
from ragtune.data import seeded_sample
from ragtune.io import DataError, read_json, require, sha256_file
from ragtune.prompts import alpaca_user_text, apply_chat_template, chat_messages

IGNORE_INDEX = -100  # label value the loss skips
FINGERPRINT_FILE = "ragtune_fingerprint.json"
SOURCES = ("cmrc", "distilled")


# --------------------------------------------------------------------------- configuration


class LoraSettings(Config):
    """The LoRA adapter's shape (peft's LoraConfig)."""

    r: int = Field(16, ge=1, description="rank of the update matrices")
    alpha: float = Field(32, gt=0, description="scaling: the update is multiplied by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")


class MixShares(Config):
    """Shares of the training sample per source; a source short of its share gives all it has."""

    cmrc: float = Field(0.8, ge=0, description="CMRC reading records (data/prepared/cmrc_sft_train.json)")
    distilled: float = Field(0.2, ge=0, description="distilled maths chain-of-thought records (data/distill)")


class SftConfig(Config):
    """`sft` (conf/sft/default.yaml): the LoRA fine-tune of the generator. The learning rate is the
    top-level `lr`, the target modules `model.lora_targets`, the precision the top-level `dtype`."""

    launcher: Literal["python", "accelerate"] = Field(
        "python", description="python, or accelerate: the stage re-runs itself under `accelerate launch`")
    accelerate_config: str = Field("conf/accelerate/multi_gpu.yaml", description="accelerate's config file (launcher=accelerate)")
    mix: MixShares = Field(MixShares(), description="shares of the training sample per source")
    max_samples: int | None = Field(20000, gt=0, description="seeded sample of the mix (null: everything)")
    val_size: float = Field(0.01, ge=0, description="held out for eval loss: a fraction (< 1) or a count")
    cutoff_len: int = Field(5120, ge=16, description="tokens per example; the prompt's middle is cut, never the answer")
    epochs: float = Field(2, gt=0, description="passes over the training records")
    max_steps: int | None = Field(None, gt=0, description="caps the run (smoke tests); null: epochs decide")
    batch_size: int = Field(2, ge=1, description="examples per device per step")
    eval_batch_size: int = Field(8, ge=1, description="examples per device per eval step")
    grad_accum: int = Field(8, ge=1, description="steps whose gradients are summed before an update")
    warmup: float = Field(0.03, ge=0, description="warmup: a fraction of the steps (< 1) or a count")
    scheduler: str = Field("cosine", description="transformers' lr_scheduler_type")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping")
    group_by_length: bool = Field(True, description="batches of similar length: less padding")
    logging_steps: int = Field(5, ge=1, description="steps between logged losses")
    eval_steps: int = Field(100, ge=1, description="steps between eval losses")
    save_steps: int = Field(100, ge=1, description="steps between checkpoints in models/sft/checkpoints (resumed after a crash)")
    lora: LoraSettings = Field(LoraSettings(), description="the adapter's shape")

    @model_validator(mode="after")
    def _some_source(self) -> SftConfig:
        if self.mix.cmrc + self.mix.distilled <= 0:
            raise ValueError("mix: every share is 0")
        return self


# --------------------------------------------------------------------------- data


def read_alpaca(path: str | os.PathLike, required: bool = True) -> list[dict[str, str]]:
    """Alpaca records [{instruction, input, output}]; a missing optional file is an empty list."""
    path = Path(path)
    if not path.exists() and not required:
        return []
    records = read_json(path)
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of Alpaca records")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record {i}: expected a JSON object, got {type(rec).__name__}")
        require(rec, ("instruction", "output"), f"{path}: record {i}")
        if not isinstance(rec["output"], str) or not rec["output"].strip():
            raise DataError(f"{path}: record {i}: empty 'output'")
    return records


def mix_sources(
    sources: Mapping[str, Sequence[dict]], weights: Mapping[str, float], *, total: int | None, seed: int
) -> tuple[list[dict], dict[str, int]]:
    """A seeded sample of `total` records (all, when None) where each source gets its weight's share.

    A source with fewer records than its share gives all it has and the others fill the gap, so
    a missing distilled set means CMRC alone, not a smaller run."""
    available = {name: list(rows) for name, rows in sources.items() if rows and weights.get(name, 0) > 0}
    if not available:
        raise DataError("no SFT training records: every source is empty or has weight 0")
    total = sum(len(rows) for rows in available.values()) if total is None else total
    counts: dict[str, int] = {name: 0 for name in sources}
    remaining, left = dict(available), total
    while remaining and left > 0:
        weight_sum = sum(weights[name] for name in remaining)
        shares = {name: left * weights[name] / weight_sum for name in remaining}
        short = {name for name in remaining if len(remaining[name]) - counts[name] <= shares[name]}
        if short:  # give those all they have, then share out the rest again
            for name in short:
                left -= len(remaining[name]) - counts[name]
                counts[name] = len(remaining[name])
                del remaining[name]
            continue
        # Largest-remainder rounding so the counts add up to `left` exactly.
        floors = {name: math.floor(share) for name, share in shares.items()}
        extra = left - sum(floors.values())
        for name in sorted(shares, key=lambda n: shares[n] - floors[n], reverse=True)[:extra]:
            floors[name] += 1
        for name, n in floors.items():
            counts[name] += n
        left = 0
    mixed: list[dict] = []
    for offset, (name, rows) in enumerate(available.items()):
        mixed += [dict(r, source=name) for r in seeded_sample(rows, counts[name], seed + offset)]
    return mixed, counts


def split_validation(records: Sequence[dict], val_size: float | int, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out `val_size` records (a fraction when < 1, else a count), seeded; at least one when > 0."""
    n = len(records)
    n_val = round(n * val_size) if 0 < val_size < 1 else int(val_size)
    n_val = max(1, n_val) if val_size > 0 else 0
    if n_val >= n:
        raise DataError(f"val_size {val_size} leaves no training records out of {n}")
    held = set(seeded_sample(range(n), n_val, seed + 1000))
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def completion_text(tokenizer, prompt: str, record: Mapping[str, Any]) -> str:
    """The assistant turn after `prompt`, exactly as the chat template writes it, ending with EOS.

    Rendering the whole conversation keeps the template's own end-of-turn marker (`<|im_end|>`
    for SmolLM2/Qwen); text the template adds after EOS (a newline) is dropped: nothing to learn."""
    messages = chat_messages(alpaca_user_text(record)) + [{"role": "assistant", "content": record["output"]}]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    eos = tokenizer.eos_token
    if not full.startswith(prompt):
        return record["output"] + eos
    answer = full[len(prompt) :]
    cut = answer.rfind(eos)
    return answer[: cut + len(eos)] if cut >= 0 else answer + eos


def encode_example(tokenizer, record: Mapping[str, Any], cutoff_len: int) -> dict[str, list[int]] | None:
    """input_ids/labels for one record: labels are -100 on every prompt token and the token ids on
    every answer token. Over `cutoff_len`, tokens are cut from the middle of the prompt (its start holds
    the system turn and instruction, its end the question and the assistant header); the answer is
    never cut. None when the answer alone leaves no room for a prompt."""
    prompt = apply_chat_template(tokenizer, alpaca_user_text(record))
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(completion_text(tokenizer, prompt, record), add_special_tokens=False)["input_ids"]
    budget = cutoff_len - len(answer_ids)
    if budget < min(len(prompt_ids), 32):
        return None
    if len(prompt_ids) > budget:
        head = budget // 2
        prompt_ids = prompt_ids[:head] + prompt_ids[len(prompt_ids) - (budget - head) :]
    return {
        "input_ids": prompt_ids + answer_ids,
        "attention_mask": [1] * (len(prompt_ids) + len(answer_ids)),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
    }


def encode_all(tokenizer, records: Sequence[Mapping[str, Any]], cutoff_len: int) -> tuple[list[dict], int]:
    """Features for every record, and how many were dropped because the answer does not fit."""
    features = [encode_example(tokenizer, r, cutoff_len) for r in records]
    return [f for f in features if f is not None], sum(f is None for f in features)


# --------------------------------------------------------------------------- resumable training


def fingerprint(settings: Mapping[str, Any], files: Sequence[str | os.PathLike]) -> str:
    """What a checkpoint was trained from: settings plus input file hashes. A checkpoint with another
    fingerprint (say, after `-S lr=1e-4`) is stale and must not be resumed."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in files:
        path = Path(path)
        digest.update(f"{path.name}:{sha256_file(path) if path.is_file() else 'absent'}".encode())
    return digest.hexdigest()


def last_checkpoint(checkpoint_dir: str | os.PathLike, print_fn=print) -> str | None:
    """The last checkpoint to resume from, or None."""
    from transformers.trainer_utils import get_last_checkpoint

    checkpoint_dir = Path(checkpoint_dir)
    last = get_last_checkpoint(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None
    if last:
        print_fn(f"sft: resuming from {last}")
    return last


def reset_if_stale(checkpoint_dir: str | os.PathLike, fp: str, print_fn=print) -> None:
    """Empty `checkpoint_dir` unless its checkpoints were made with fingerprint `fp`; then record `fp`."""
    checkpoint_dir = Path(checkpoint_dir)
    marker = checkpoint_dir / FINGERPRINT_FILE
    if checkpoint_dir.is_dir() and not (marker.exists() and json.loads(marker.read_text())["fingerprint"] == fp):
        if any(checkpoint_dir.iterdir()):
            print_fn(f"sft: {checkpoint_dir} holds checkpoints of other settings or data; starting afresh")
        shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"fingerprint": fp}) + "\n")


def lora_config(cfg: LoraSettings, targets: str | Sequence[str]):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets if isinstance(targets, str) else sorted(targets),
        task_type="CAUSAL_LM",
    )


def training_arguments(cfg: SftConfig, *, lr: float, seed: int, output_dir: str | os.PathLike, has_eval: bool,
                       device: str, dtype: str):
    """Trainer settings: weights stay fp32, `dtype` bfloat16/float16 turns on autocast."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        learning_rate=lr,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        seed=seed,
        data_seed=seed,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        report_to="none",  # MLflow is logged by the stage itself, into its one run
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=device == "cpu",
    )


def train_lora(
    *,
    base_model_dir: str | os.PathLike,
    train_records: Sequence[Mapping[str, Any]],
    val_records: Sequence[Mapping[str, Any]],
    cfg: SftConfig,
    lr: float,
    seed: int,
    lora_targets: str | Sequence[str],
    checkpoint_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike | None,
    run_fingerprint: str,
    device: str = "cpu",
    dtype: str = "float32",
    print_fn=print,
) -> dict[str, Any]:
    """Train a LoRA adapter, resuming from `checkpoint_dir` when it holds checkpoints of the same
    fingerprint; save it to `adapter_dir` (main process only). Returns the trainer's log history
    and a summary."""
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, set_seed

    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    train_features, dropped_train = encode_all(tokenizer, train_records, cfg.cutoff_len)
    val_features, dropped_val = encode_all(tokenizer, val_records, cfg.cutoff_len)
    if not train_features:
        raise DataError(f"no training record fits cutoff_len={cfg.cutoff_len}")

    model = AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=torch.float32)
    model = get_peft_model(model, lora_config(cfg.lora, lora_targets))
    trainable, total = model.get_nb_trainable_parameters()

    if int(os.environ.get("RANK", "0")) == 0:  # one process manages the folder
        reset_if_stale(checkpoint_dir, run_fingerprint, print_fn)
    resume = last_checkpoint(checkpoint_dir, print_fn)
    args = training_arguments(cfg, lr=lr, seed=seed, output_dir=checkpoint_dir, has_eval=bool(val_features),
                              device=device, dtype=dtype)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_features),
        eval_dataset=Dataset.from_list(val_features) if val_features else None,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
    )
    result = trainer.train(resume_from_checkpoint=resume)
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if val_features and (not evals or evals[-1]["step"] != trainer.state.global_step):
        evals.append(trainer.evaluate())
    final_eval = evals[-1] if evals else {}
    if adapter_dir is not None and trainer.is_world_process_zero():
        trainer.model.save_pretrained(str(adapter_dir), safe_serialization=True)
    history = trainer.state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    return {
        "log_history": history,
        "metrics": {
            "train_loss": run_mean_loss(history),
            "first_loss": train_losses[0] if train_losses else None,
            "last_loss": train_losses[-1] if train_losses else None,
            "eval_loss": final_eval.get("eval_loss"),
            "steps": trainer.state.global_step,
            "epochs": trainer.state.epoch,
            "resumed_from_step": int(Path(resume).name.split("-")[-1]) if resume else 0,
            "train_examples": len(train_features),
            "val_examples": len(val_features),
            "dropped_too_long": dropped_train + dropped_val,
            "train_tokens": sum(len(f["input_ids"]) for f in train_features),
            "answer_tokens": sum(sum(t != IGNORE_INDEX for t in f["labels"]) for f in train_features),
            "trainable_params": trainable,
            "total_params": total,
            "bf16": args.bf16,
            "runtime_s": result.metrics.get("train_runtime"),  # this invocation's, resumed steps excluded
        },
    }


def run_mean_loss(log_history: Sequence[Mapping[str, Any]]) -> float | None:
    """Mean training loss over the whole run, each logged loss weighted by the steps it covers.
    Unlike the Trainer's `training_loss`, which only counts this invocation's steps, it stays right
    after a resume (a run resumed from its final checkpoint would otherwise report 0)."""
    total, steps, previous = 0.0, 0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            covered = max(int(entry["step"]) - previous, 1)
            total, steps, previous = total + entry["loss"] * covered, steps + covered, int(entry["step"])
    return total / steps if steps else None


def curve_rows(log_history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Trainer log history -> one row per step: step, loss, eval_loss, lr (None where not logged)."""
    by_step: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        if "loss" not in entry and "eval_loss" not in entry:
            continue  # the final summary entry (train_runtime, ...)
        row = by_step.setdefault(entry["step"], {"step": entry["step"], "loss": None, "eval_loss": None, "lr": None})
        if "loss" in entry:
            row["loss"] = entry["loss"]
            row["lr"] = entry.get("learning_rate")
        if "eval_loss" in entry:
            row["eval_loss"] = entry["eval_loss"]
    return [by_step[s] for s in sorted(by_step)]


def write_curves_tsv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    from ragtune.io import atomic_path

    columns = ("step", "loss", "eval_loss", "lr")
    with atomic_path(path) as tmp:
        lines = ["\t".join(columns)]
        lines += ["\t".join("" if row[c] is None else f"{row[c]:.6g}" for c in columns) for row in rows]
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- scale-out

UNDER_ACCELERATE = "RAGTUNE_UNDER_ACCELERATE"


def accelerate_command(config_file: str | os.PathLike, script: str | os.PathLike, python: str | None = None) -> list[str]:
    """`accelerate launch --config_file <config> <script>` run with this interpreter (so the venv's
    accelerate, whatever PATH says)."""
    config_file = Path(config_file)
    if not config_file.is_file():
        raise FileNotFoundError(f"accelerate config {config_file} not found (see conf/accelerate/)")
    return [
        python or sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_file),
        str(script),
    ]


def under_accelerate() -> bool:
    return os.environ.get(UNDER_ACCELERATE) == "1"
