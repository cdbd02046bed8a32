"""Supervised fine-tuning: Alpaca records -> chat-template features (loss on the answer only) ->
a LoRA adapter trained with transformers' Trainer and peft, resumable from its checkpoints."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
import zipfile
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ragtune.config import Config
from ragtune.data import seeded_sample
from ragtune.devices import (  # the launcher helpers live beside the device decisions; re-exported here
    LAUNCHER_PID,  # noqa: F401
    UNDER_ACCELERATE,  # noqa: F401
    accelerate_command,  # noqa: F401
    exit_with_launcher,  # noqa: F401
    relaunch_under_accelerate,  # noqa: F401
    training_precision,
    under_accelerate,  # noqa: F401
)
from ragtune.raft import ContextSettings
from ragtune.io import DataError, sha256_file
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

    cmrc: float = Field(0.8, ge=0, description="CMRC reading records (contexts built by ragtune.raft)")
    distilled: float = Field(0.2, ge=0, description="distilled maths chain-of-thought records (data/distill)")


class SftConfig(Config):
    """`sft` (conf/sft/default.yaml): the LoRA fine-tune of the generator. The learning rate is the
    top-level `lr`, the target modules `model.lora_targets`, the precision the top-level `dtype`."""

    launcher: Literal["python", "accelerate"] = Field(
        "python", description="python, or accelerate: the stage re-runs itself under `accelerate launch`")
    accelerate_config: str = Field("conf/accelerate/multi_gpu.yaml", description="accelerate's config file (launcher=accelerate)")
    quantization: Literal["none", "4bit"] = Field(
        "none", description="none, or 4bit: QLoRA (bitsandbytes nf4, double quant, bf16 compute) for a 7B on one GPU; needs CUDA")
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
    contexts: ContextSettings = Field(ContextSettings(), description="how each CMRC example's context is built (ragtune.raft)")

    @model_validator(mode="after")
    def _some_source(self) -> SftConfig:
        if self.mix.cmrc + self.mix.distilled <= 0:
            raise ValueError("mix: every share is 0")
        return self


# --------------------------------------------------------------------------- data


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


TRAINER_STATE = "trainer_state.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")  # the Trainer's folders, as get_last_checkpoint reads them


def checkpoint_problem(folder: str | os.PathLike, expected_keys: Collection[str] | None = None) -> str | None:
    """Why the Trainer could not resume from `folder` (a torn save: killed mid-write, a full disk, a
    cut copy), or None when it is complete: trainer_state.json (written last) parses, the adapter's
    config parses and its weights load with exactly `expected_keys` (when given), and every torch
    archive beside them (optimizer, scheduler, RNG states) is whole."""
    folder = Path(folder)
    state_file = folder / TRAINER_STATE
    if not state_file.is_file():
        return f"no {TRAINER_STATE} (the Trainer writes it last: the save did not finish)"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{TRAINER_STATE} does not parse ({err})"
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return f"{TRAINER_STATE} has no global_step"
    try:
        if not isinstance(json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8")), dict):
            return f"{ADAPTER_CONFIG} is not a JSON object"
    except FileNotFoundError:
        return f"no {ADAPTER_CONFIG}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{ADAPTER_CONFIG} does not parse ({err})"
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        return f"no {ADAPTER_WEIGHTS}"
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as fh:
            keys = set(fh.keys())
            for key in keys:  # read every tensor: a truncated file fails here, not in the Trainer
                fh.get_tensor(key)
    except Exception as err:  # safetensors raises its own error types (and OSError, ValueError)
        return f"{ADAPTER_WEIGHTS} does not load ({type(err).__name__}: {err})"
    if not keys:
        return f"{ADAPTER_WEIGHTS} holds no tensors"
    if expected_keys is not None and keys != set(expected_keys):
        missing, unexpected = sorted(set(expected_keys) - keys), sorted(keys - set(expected_keys))
        return (f"{ADAPTER_WEIGHTS} does not hold this adapter's tensors ({len(missing)} missing"
                f"{', e.g. ' + missing[0] if missing else ''}; {len(unexpected)} unexpected"
                f"{', e.g. ' + unexpected[0] if unexpected else ''})")
    for archive in sorted([*folder.glob("*.pt"), *folder.glob("rng_state*.pth")]):
        if not zipfile.is_zipfile(archive):  # torch.save writes a zip; a cut one lacks its directory
            return f"{archive.name} is truncated (not a whole torch archive)"
    return None


def last_checkpoint(
    checkpoint_dir: str | os.PathLike,
    print_fn=print,
    *,
    expected_keys: Collection[str] | None = None,
    skipped: list[dict[str, str]] | None = None,
) -> str | None:
    """The newest complete checkpoint to resume from, or None.

    A torn one (see `checkpoint_problem`) is skipped, never resumed from: each is printed with its
    reason and appended to `skipped` as {"checkpoint", "reason"}. It is left in place (every
    process of a multi-GPU run calls this, so none deletes anything); the Trainer overwrites it
    when training reaches its step again."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir() if (m := _CHECKPOINT_NAME.match(p.name)) and p.is_dir()]
    for _, folder in sorted(found, reverse=True):
        problem = checkpoint_problem(folder, expected_keys)
        if problem is None:
            print_fn(f"sft: resuming from {folder}")
            return str(folder)
        print_fn(f"sft: skipping torn checkpoint {folder}: {problem}")
        if skipped is not None:
            skipped.append({"checkpoint": folder.name, "reason": problem})
    return None


def _recorded_fingerprint(marker: Path) -> str | None:
    """The fingerprint `marker` records; None when it is missing or torn (then nothing is resumed)."""
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return recorded.get("fingerprint") if isinstance(recorded, dict) else None


def reset_if_stale(checkpoint_dir: str | os.PathLike, fp: str, print_fn=print) -> None:
    """Empty `checkpoint_dir` unless its checkpoints were made with fingerprint `fp`; then record `fp`.
    A missing or torn fingerprint file counts as other settings: its checkpoints' origin is unknown."""
    from ragtune.io import atomic_path

    checkpoint_dir = Path(checkpoint_dir)
    marker = checkpoint_dir / FINGERPRINT_FILE
    if checkpoint_dir.is_dir() and _recorded_fingerprint(marker) != fp:
        if any(checkpoint_dir.iterdir()):
            print_fn(f"sft: {checkpoint_dir} holds checkpoints of other settings or data; starting afresh")
        shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(marker) as tmp:  # never torn itself
        tmp.write_text(json.dumps({"fingerprint": fp}) + "\n", encoding="utf-8")


def lora_config(cfg: LoraSettings, targets: str | Sequence[str]):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets if isinstance(targets, str) else sorted(targets),
        task_type="CAUSAL_LM",
    )


def bitsandbytes_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def check_quantization(quantization: str, device: str, *, has_cuda: bool | None = None,
                       has_bitsandbytes: bool | None = None) -> None:
    """Refuse `sft.quantization=4bit` where it cannot run, before anything is loaded: QLoRA's 4-bit
    kernels (bitsandbytes) need a CUDA GPU. Raises UserError with one line saying what to do."""
    from ragtune.config import UserError

    if quantization == "none":
        return
    if quantization != "4bit":
        raise UserError(f"sft.quantization '{quantization}' is not one of none, 4bit")
    if has_cuda is None:
        from ragtune.devices import cuda_available

        has_cuda = cuda_available()
    if not has_cuda:
        raise UserError("sft.quantization=4bit (QLoRA) needs a CUDA GPU and this machine has none: "
                        "use sft.quantization=none here")
    if not device.startswith("cuda"):
        raise UserError(f"sft.quantization=4bit (QLoRA) runs on a CUDA GPU, but device is '{device}': set device=auto or cuda")
    if not (bitsandbytes_available() if has_bitsandbytes is None else has_bitsandbytes):
        raise UserError("sft.quantization=4bit (QLoRA) needs bitsandbytes: `pip install bitsandbytes` "
                        "(or use sft.quantization=none)")


def bnb_4bit_config():
    """QLoRA's quantization: 4-bit NormalFloat weights, double quantization of their scales, bf16 compute."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def training_arguments(cfg: SftConfig, *, lr: float, seed: int, output_dir: str | os.PathLike, has_eval: bool,
                       device: str, dtype: str):
    """Trainer settings: weights stay fp32, `dtype` bfloat16/float16 turns on autocast
    (ragtune.devices.training_precision), `device` cpu keeps the run off any GPU."""
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
        **training_precision(device, dtype),
    )


def save_adapter(model, adapter_dir: str | os.PathLike) -> None:
    """Save a peft model's adapter to `adapter_dir`, byte-identical for identical weights and settings."""
    model.save_pretrained(str(adapter_dir), safe_serialization=True)
    make_adapter_deterministic(adapter_dir)


def make_adapter_deterministic(adapter_dir: str | os.PathLike) -> None:
    """Make a saved adapter's bytes depend on its content only: it is a DVC out, and changed bytes
    for equal weights rerun every stage after sft.

    peft writes `target_modules` (a set once "all-linear" is expanded) in set order, which depends
    on PYTHONHASHSEED: adapter_config.json is rewritten with sorted module lists and sorted keys.
    adapter_model.safetensors is deterministic for equal tensors (tensors sorted by dtype and name,
    peft's one metadata entry); its header is rewritten only if a metadata map with several keys
    (serialised in hash-map order) ever shows up."""
    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / ADAPTER_CONFIG
    config = json.loads(config_file.read_text(encoding="utf-8"))
    for key in ("target_modules", "exclude_modules", "modules_to_save"):  # sets in peft: order carries nothing
        value = config.get(key)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            config[key] = sorted(value)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    weights = adapter_dir / ADAPTER_WEIGHTS
    if weights.is_file():
        canonicalize_safetensors_header(weights)


def canonicalize_safetensors_header(path: str | os.PathLike) -> bool:
    """Rewrite a safetensors file's header with its `__metadata__` keys sorted when they are not
    (the Rust writer serialises that map in per-process hash order). True when rewritten."""
    path = Path(path)
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
        metadata = header.get("__metadata__")
        if not isinstance(metadata, dict) or list(metadata) == sorted(metadata):
            return False
        header["__metadata__"] = dict(sorted(metadata.items()))
        ordered = {"__metadata__": header.pop("__metadata__"), **header}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as the writer pads it
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(text)))
            out.write(text)
            shutil.copyfileobj(fh, out)  # the tensor data: offsets are relative to its start
    os.replace(tmp, path)
    return True


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
    from peft import get_peft_model, get_peft_model_state_dict
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

    # The arguments first: under a launcher they join the process group, which the checkpoint
    # folder's bookkeeping below needs.
    args = training_arguments(cfg, lr=lr, seed=seed, output_dir=checkpoint_dir, has_eval=bool(val_features),
                              device=device, dtype=dtype)
    print_fn(f"sft: rank {args.process_index} of {args.world_size} training on {args.device} "
             f"({len(train_features)} examples, per-device batch {cfg.batch_size})")
    if cfg.quantization == "4bit":
        check_quantization(cfg.quantization, device)
        from peft import prepare_model_for_kbit_training

        model = AutoModelForCausalLM.from_pretrained(str(base_model_dir), quantization_config=bnb_4bit_config(),
                                                     dtype=torch.bfloat16, device_map={"": args.device.index or 0})
        model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=torch.float32)
    model = get_peft_model(model, lora_config(cfg.lora, lora_targets))
    trainable, total = model.get_nb_trainable_parameters()

    # One process manages the folder, the others look only once it is done (a stale checkpoint
    # must not be resumed by one rank while rank 0 deletes it).
    with args.main_process_first(local=False, desc="checkpoint folder"):
        if args.process_index == 0:
            reset_if_stale(checkpoint_dir, run_fingerprint, print_fn)
    torn: list[dict[str, str]] = []
    resume = last_checkpoint(checkpoint_dir, print_fn, expected_keys=get_peft_model_state_dict(model).keys(), skipped=torn)
    trainer = Trainer(
        model=model,
        args=args,
        # plain lists of feature dicts: the Trainer needs no `datasets` for them
        train_dataset=train_features,
        eval_dataset=val_features or None,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
    )
    result = trainer.train(resume_from_checkpoint=resume)
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if val_features and (not evals or evals[-1]["step"] != trainer.state.global_step):
        evals.append(trainer.evaluate())
    final_eval = evals[-1] if evals else {}
    if adapter_dir is not None and trainer.is_world_process_zero():
        save_adapter(trainer.model, adapter_dir)
    history = trainer.state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    return {
        "log_history": history,
        "torn_checkpoints": torn,  # [{checkpoint, reason}] skipped when looking for one to resume from
        "metrics": {
            "train_loss": run_mean_loss(history),
            "first_loss": train_losses[0] if train_losses else None,
            "last_loss": train_losses[-1] if train_losses else None,
            "eval_loss": final_eval.get("eval_loss"),
            "steps": trainer.state.global_step,
            "epochs": trainer.state.epoch,
            "resumed_from_step": int(Path(resume).name.split("-")[-1]) if resume else 0,
            "skipped_torn_checkpoints": len(torn),
            "train_examples": len(train_features),
            "val_examples": len(val_features),
            "dropped_too_long": dropped_train + dropped_val,
            "train_tokens": sum(len(f["input_ids"]) for f in train_features),
            "answer_tokens": sum(sum(t != IGNORE_INDEX for t in f["labels"]) for f in train_features),
            "trainable_params": trainable,
            "total_params": total,
            "bf16": args.bf16,
            "quantization": cfg.quantization,
            "world_size": args.world_size,
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

