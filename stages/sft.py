"""sft: LoRA fine-tune of the base generator on CMRC (+ distilled maths CoT when distill has built it)."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import ragtune.data
import ragtune.prompts
import ragtune.training
from ragtune.config import load_params
from ragtune.io import atomic_dir, write_json
from ragtune.tracking import log_model_dir, log_step_metrics, stage_run
from ragtune.training import (
    UNDER_ACCELERATE,
    accelerate_command,
    curve_rows,
    fingerprint,
    mix_sources,
    read_alpaca,
    split_validation,
    train_lora,
    under_accelerate,
    write_curves_tsv,
)

BASE = Path("models/base/generator")
CMRC = Path("data/prepared/cmrc_sft_train.json")
DISTILLED = Path("data/distill/distilled_train.json")
ADAPTER = Path("models/sft/adapter")
CHECKPOINTS = Path("models/sft/checkpoints")
REPORTS = Path("reports/sft")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args()
    params = load_params(args.params)
    cfg, lr, seed, targets = params["sft"], params["lr"], params["seed"], params["model"]["lora_targets"]

    if cfg.get("launcher", "python") == "accelerate" and not under_accelerate():
        cmd = accelerate_command(cfg["accelerate_config"], __file__) + sys.argv[1:]
        print("sft:", " ".join(cmd), flush=True)
        sys.exit(subprocess.call(cmd, env={**os.environ, UNDER_ACCELERATE: "1"}))
    is_main = int(os.environ.get("RANK", "0")) == 0

    sources = {"cmrc": read_alpaca(CMRC), "distilled": read_alpaca(DISTILLED, required=False)}
    if not sources["distilled"]:
        print(f"sft: {DISTILLED} is missing or empty; training on CMRC alone", flush=True)
    records, counts = mix_sources(sources, cfg["mix"], cfg["max_samples"], seed)
    train, val = split_validation(records, cfg["val_size"], seed)
    print(f"sft: {len(train)} train / {len(val)} val records, from {counts}", flush=True)

    settings = {"sft": cfg, "lr": lr, "seed": seed, "lora_targets": targets}
    # The code that shapes training is part of what a checkpoint was made from: after a change
    # to it, DVC reruns sft and resuming an old run's final checkpoint would skip the new code.
    code = [Path(__file__), *(Path(m.__file__) for m in (ragtune.training, ragtune.prompts, ragtune.data))]
    fp = fingerprint(settings, [BASE / "model.safetensors", CMRC, DISTILLED, *code])
    if not is_main:  # other accelerate processes train alongside; the main one writes and logs
        train_lora(BASE, train, val, cfg, lr, seed, targets, CHECKPOINTS, None, fp)
        return
    tracked = {"sft": cfg, "lr": lr, "seed": seed, "model": {"lora_targets": targets}}
    with stage_run("sft", tracked) as mlflow:
        with atomic_dir(ADAPTER) as adapter_tmp:
            result = train_lora(BASE, train, val, cfg, lr, seed, targets, CHECKPOINTS, adapter_tmp, fp)
            metrics = result["metrics"] | {f"records_{name}": n for name, n in counts.items()}
            curves = curve_rows(result["log_history"])
            write_curves_tsv(REPORTS / "curves.tsv", curves)
            write_json(REPORTS / "metrics.json", metrics)
        log_step_metrics(curves)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None})
        mlflow.log_artifact(str(REPORTS / "curves.tsv"))
        log_model_dir(ADAPTER, name="sft-adapter", model_type="peft-lora", params={"lr": lr, "lora_targets": targets})
        print(f"sft: adapter in {ADAPTER}; {metrics}", flush=True)


if __name__ == "__main__":
    main()
