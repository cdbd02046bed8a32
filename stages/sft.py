"""sft: LoRA fine-tune of the base generator on CMRC (+ distilled maths CoT when distill has built it)."""

import os
import subprocess
import sys
from pathlib import Path

import ragtune.data
import ragtune.prompts
import ragtune.training
from ragtune.config import read_params, run_stage, stage_parser
from ragtune.devices import placement
from ragtune.io import atomic_dir, write_json
from ragtune.models import ModelConfig
from ragtune.tracking import log_model_dir, log_step_metrics, stage_run
from ragtune.training import (
    UNDER_ACCELERATE,
    SftConfig,
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
    args = stage_parser(__doc__).parse_args()
    params = read_params(args.params)
    cfg, common = params.group("sft", SftConfig), params.common()
    lr, seed, targets = common.lr, common.seed, params.group("model", ModelConfig).lora_targets

    if cfg.launcher == "accelerate" and not under_accelerate():
        cmd = accelerate_command(cfg.accelerate_config, __file__) + sys.argv[1:]
        print("sft:", " ".join(cmd), flush=True)
        sys.exit(subprocess.call(cmd, env={**os.environ, UNDER_ACCELERATE: "1"}))
    is_main = int(os.environ.get("RANK", "0")) == 0
    device, dtype = placement(common.device, common.dtype)

    sources = {"cmrc": read_alpaca(CMRC), "distilled": read_alpaca(DISTILLED, required=False)}
    if not sources["distilled"]:
        print(f"sft: {DISTILLED} is missing or empty; training on CMRC alone", flush=True)
    records, counts = mix_sources(sources, cfg.mix.model_dump(), total=cfg.max_samples, seed=seed)
    train, val = split_validation(records, cfg.val_size, seed)
    print(f"sft: {len(train)} train / {len(val)} val records, from {counts}; {device}, {dtype}", flush=True)

    settings = {"sft": cfg.model_dump(), "lr": lr, "seed": seed, "lora_targets": targets, "dtype": dtype}
    # The code that shapes training is part of what a checkpoint was made from: after a change
    # to it, DVC reruns sft and resuming an old run's final checkpoint would skip the new code.
    code = [Path(__file__), *(Path(m.__file__) for m in (ragtune.training, ragtune.prompts, ragtune.data))]
    run_fingerprint = fingerprint(settings, [BASE / "model.safetensors", CMRC, DISTILLED, *code])
    training = {"base_model_dir": BASE, "train_records": train, "val_records": val, "cfg": cfg, "lr": lr,
                "seed": seed, "lora_targets": targets, "checkpoint_dir": CHECKPOINTS,
                "run_fingerprint": run_fingerprint, "device": device, "dtype": dtype}
    if not is_main:  # other accelerate processes train alongside; the main one writes and logs
        train_lora(adapter_dir=None, **training)
        return
    tracked = {"sft": cfg.model_dump(), "lr": lr, "seed": seed, "model": {"lora_targets": targets},
               "device": device, "dtype": dtype}
    with stage_run("sft", tracked) as mlflow:
        with atomic_dir(ADAPTER) as adapter_tmp:
            result = train_lora(adapter_dir=adapter_tmp, **training)
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
    run_stage("sft", main)
