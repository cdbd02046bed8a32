"""Export: the LoRA adapter merged into its base model as one standalone Hugging Face folder (config,
safetensors weights, tokenizer with its chat template, generation config), for what cannot or should
not load an adapter: vLLM without `--enable-lora`, llama.cpp's `convert_hf_to_gguf.py` (then Ollama).

    ragtune export [--adapter models/sft/adapter] [--base models/base/generator] [--out models/merged]

The merge is checked before the folder is published: logits of base + adapter (peft, unmerged) and of
the merged folder as saved (reloaded from disk) on a few fixed prompts, both in float32. The largest
|difference| is printed and written to `<out>/ragtune_export.json`. The folder appears only when the
check passes (ragtune.io.atomic_dir): a failure leaves whatever was at `--out` as it was and no half
folder.

Tolerance. Saved in float32, the merged weight W + (alpha/r)·B·A differs from computing W·x and
(alpha/r)·B·(A·x) separately only by float32 rounding (~6e-8 relative per operation), accumulated
through 30 layers into logits of magnitude ~10-40: measured 9.2e-5 on SmolLM2-135M with a random
r=8 adapter on every linear layer (3 prompts, 230 positions; tests/test_export.py), where the adapter
itself moves the logits by up to 4.4. `FLOAT32_TOLERANCE` = 1e-3 leaves ~10x room for other
hardware's summation order and is still >1000x below what a wrong merge gives (a layer left out, a
wrong scale, the adapter not applied: differences of the adapter's own size).
Saved in bfloat16/float16 (the base's own dtype, e.g. a 7B), rounding each merged weight to 8 or 11
bits is unavoidable and larger; the tolerance is then measured on the spot: `LOW_PRECISION_FACTOR`
times the difference that running base + adapter unmerged in that dtype already makes against the
float32 reference (what serving the adapter in that dtype would give anyway), never below 1e-3.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ragtune.config import UserError

REPORT = "ragtune_export.json"
FLOAT32_TOLERANCE = 1e-3
LOW_PRECISION_FACTOR = 2.0
# A few fixed prompts, in the shapes the assistant sees: a reading question with its passage (Chinese),
# a maths word problem, an English question. Short: the check runs on the CPU too.
PROMPTS = (
    "请用下面的文段的原文来回答问题\n\n### 已知文段:第3号盒子是红色的，放在第6层架子上。\n\n### 问题:第3号盒子是什么颜色？\n",
    ("Tom has 3 apples and buys 5 more. How many apples does he have now?\n\n"
     "Please reason step by step, and put your final answer within \\boxed{}."),
    "What did critics praise about the album?",
)


class ExportError(UserError, RuntimeError):
    """The merge could not be made or did not pass its check (nothing was written)."""


def _stored_dtype(base_dir: Path) -> str:
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def check_inputs(base_dir: Path, adapter_dir: Path, out_dir: Path) -> None:
    """Refuse, before loading anything, what would fail or destroy something of the user's."""
    if not (base_dir / "config.json").is_file():
        raise ExportError(f"{base_dir}: no config.json (not a Hugging Face model folder; run `dvc repro fetch`)")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ExportError(f"{adapter_dir}: no adapter_config.json (not a peft adapter; run `dvc repro sft`)")
    out = out_dir.resolve()
    for given, name in ((base_dir, "--base"), (adapter_dir, "--adapter")):
        if out == given.resolve() or given.resolve().is_relative_to(out):
            raise ExportError(f"--out {out_dir} would replace {name} {given}: choose another folder")
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / REPORT).is_file())):
        raise ExportError(f"{out_dir} exists and is not an earlier `ragtune export`: refusing to replace it")


def _logits(model, tokenizer, prompts: Sequence[str], device: str) -> list[Any]:
    """Float32 logits of each prompt, one prompt per forward pass (no padding), on the CPU."""
    import torch

    from ragtune.prompts import apply_chat_template

    out = []
    with torch.inference_mode():
        for text in prompts:
            enc = tokenizer(apply_chat_template(tokenizer, text), return_tensors="pt", add_special_tokens=False).to(device)
            out.append(model(**enc).logits[0].float().cpu())
    return out


def _max_diff(a: Sequence[Any], b: Sequence[Any]) -> tuple[float, float]:
    """(max |a - b| over every position and vocabulary entry, share of positions with the same argmax)."""
    diff = max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))
    same = sum(int((x.argmax(-1) == y.argmax(-1)).sum()) for x, y in zip(a, b, strict=True))
    return diff, same / sum(x.shape[0] for x in a)


def export_merged(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    tolerance: float | None = None,
    prompts: Sequence[str] = PROMPTS,
    print_fn=print,
) -> dict[str, Any]:
    """Merge `adapter_dir` into `base_dir`, save the result to `out_dir` in `dtype` ('auto': the base's
    own), check its logits against base + adapter in float32 on `device`, and return the report
    (also written to `<out_dir>/ragtune_export.json`). Raises ExportError, writing nothing, when the
    largest difference exceeds the tolerance (module docstring)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragtune.io import atomic_dir, sha256_file

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    check_inputs(base_dir, adapter_dir, out_dir)
    save_dtype = _stored_dtype(base_dir) if dtype == "auto" else dtype
    if save_dtype not in ("float32", "bfloat16", "float16"):
        raise ExportError(f"dtype '{dtype}' is not one of auto, float32, bfloat16, float16")
    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))

    def load_base(torch_dtype):
        return AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch_dtype).to(device).eval()

    model = PeftModel.from_pretrained(load_base(torch.float32), str(adapter_dir)).eval()
    reference = _logits(model, tokenizer, prompts, device)  # base + adapter, unmerged, float32
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    noise = None
    if save_dtype != "float32":  # what base + adapter unmerged in the low precision already differs by
        low = PeftModel.from_pretrained(load_base(getattr(torch, save_dtype)), str(adapter_dir)).eval()
        noise, _ = _max_diff(reference, _logits(low, tokenizer, prompts, device))
        del low
    limit = tolerance if tolerance is not None else (
        FLOAT32_TOLERANCE if noise is None else max(FLOAT32_TOLERANCE, LOW_PRECISION_FACTOR * noise))

    with atomic_dir(out_dir) as tmp:
        merged = model.merge_and_unload()
        merged.to(getattr(torch, save_dtype)).save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))  # with its chat template: vLLM and llama.cpp read it from here
        del merged, model
        # the folder as saved, loaded the way a user loads it, compared in float32
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).to(device).eval()
        diff, top1 = _max_diff(reference, _logits(reloaded, tokenizer, prompts, device))
        del reloaded
        report = {
            "base": str(base_dir),
            "adapter": str(adapter_dir),
            "adapter_sha256": sha256_file(adapter_dir / "adapter_model.safetensors")
            if (adapter_dir / "adapter_model.safetensors").is_file() else None,
            "lora": {k: adapter_config.get(k) for k in ("r", "lora_alpha", "target_modules")},
            "dtype": save_dtype,
            "device": device,
            "prompts": len(prompts),
            "positions": sum(x.shape[0] for x in reference),
            "max_abs_logit_diff": diff,
            "tolerance": limit,
            "unmerged_low_precision_diff": noise,
            "top1_agreement": top1,
            "seconds": round(time.time() - start, 1),
        }
        print_fn(f"export: max |logit difference| merged vs base + adapter (float32, {report['positions']} positions, "
                 f"{len(prompts)} prompts): {diff:.3g} (tolerance {limit:.3g}); same top token {top1:.1%}")
        if not diff <= limit:  # also catches NaN
            raise ExportError(f"the merged model's logits differ from base + adapter by {diff:.3g} "
                              f"(> tolerance {limit:.3g}): nothing written to {out_dir}")
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print_fn(f"export: {out_dir} ({save_dtype}) from {base_dir} + {adapter_dir}")
    return report
