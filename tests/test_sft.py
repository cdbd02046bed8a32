"""sft: answer-only labels, the data mix, the accelerate command, and the stage itself on a tiny
slice (killed mid-run, resumed, loss down, adapter changes outputs, tracked in MLflow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ragtune.config import compose
from ragtune.io import DataError
from ragtune.prompts import alpaca_record, alpaca_user_text, apply_chat_template, cmrc_prompt
from ragtune.records import KbChunk, ReadingQuestion, write_records
from ragtune.training import (
    IGNORE_INDEX,
    accelerate_command,
    curve_rows,
    encode_example,
    mix_sources,
    reset_if_stale,
    run_mean_loss,
    split_validation,
)
from tests.conftest import ROOT, project_env


@pytest.fixture(scope="module")
def tokenizer(base_generator):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_generator))


def cmrc_records(n: int) -> list[dict]:
    """Tiny CMRC-style records with one consistent pattern, so a few steps visibly learn it."""
    colours = ["红色", "蓝色", "绿色", "黄色"]
    return [
        alpaca_record(
            cmrc_prompt(f"第{i}号盒子是{colours[i % 4]}的，放在第{i + 3}层架子上。", f"第{i}号盒子是什么颜色？"),
            colours[i % 4],
        )
        for i in range(n)
    ]


def cmrc_questions(n: int) -> tuple[list[KbChunk], list[ReadingQuestion]]:
    """The same pattern as cmrc_records, as split writes it: one article (one chunk) per question."""
    colours = ["红色", "蓝色", "绿色", "黄色"]
    chunks, questions = [], []
    for i in range(n):
        text = f"第{i}号盒子是{colours[i % 4]}的，放在第{i + 3}层架子上。"
        chunks.append(KbChunk(chunk_id=f"B{i}-0", article_id=f"B{i}", title="", text=text))
        questions.append(ReadingQuestion(id=f"q{i}", question=f"第{i}号盒子是什么颜色？", answers=[colours[i % 4]],
                                         article_id=f"B{i}", gold_chunk_ids=[f"B{i}-0"], context=text))
    return chunks, questions


def test_prompt_tokens_are_masked_and_every_answer_token_is_learned(tokenizer):
    record = cmrc_records(1)[0]
    prompt_ids = tokenizer(apply_chat_template(tokenizer, alpaca_user_text(record)), add_special_tokens=False)[
        "input_ids"
    ]
    feature = encode_example(tokenizer, record, cutoff_len=1024)
    n = len(prompt_ids)
    assert feature["input_ids"][:n] == prompt_ids  # the serving prompt, token for token
    assert all(label == IGNORE_INDEX for label in feature["labels"][:n])
    answer = feature["labels"][n:]
    assert answer and all(label != IGNORE_INDEX for label in answer)
    assert answer == feature["input_ids"][n:]
    assert answer[-1] == tokenizer.eos_token_id  # the model learns to stop
    assert tokenizer.decode(answer) == record["output"] + tokenizer.eos_token


def test_cutoff_cuts_the_prompt_middle_never_the_answer(tokenizer):
    record = alpaca_record(cmrc_prompt("很长的文段。" * 80, "问题是什么？"), "一个相当长的答案" * 4)
    full = encode_example(tokenizer, record, cutoff_len=4096)
    n_answer = sum(label != IGNORE_INDEX for label in full["labels"])
    cut = encode_example(tokenizer, record, cutoff_len=n_answer + 64)
    assert len(cut["input_ids"]) == n_answer + 64
    assert cut["labels"][-n_answer:] == full["labels"][-n_answer:]  # the whole answer, EOS included
    assert cut["input_ids"][:32] == full["input_ids"][:32]  # system turn and instruction start
    assert cut["input_ids"][64 - 32 : 64] == full["input_ids"][-n_answer - 32 : -n_answer]  # question + header
    assert encode_example(tokenizer, record, cutoff_len=n_answer + 4) is None  # no room for a prompt


def test_mix_follows_the_weights_and_falls_back_to_cmrc_alone():
    cmrc, distilled = cmrc_records(100), [alpaca_record(f"q{i}", f"a{i}") for i in range(100)]
    mixed, counts = mix_sources({"cmrc": cmrc, "distilled": distilled}, {"cmrc": 0.75, "distilled": 0.25}, total=40, seed=1)
    assert counts == {"cmrc": 30, "distilled": 10} and len(mixed) == 40
    assert mixed == mix_sources({"cmrc": cmrc, "distilled": distilled}, {"cmrc": 0.75, "distilled": 0.25}, total=40, seed=1)[0]
    short, counts = mix_sources({"cmrc": cmrc, "distilled": distilled[:3]}, {"cmrc": 0.5, "distilled": 0.5}, total=40, seed=1)
    assert counts == {"cmrc": 37, "distilled": 3} and len(short) == 40
    alone, counts = mix_sources({"cmrc": cmrc, "distilled": []}, {"cmrc": 0.8, "distilled": 0.2}, total=40, seed=1)
    assert counts == {"cmrc": 40, "distilled": 0} and {r["source"] for r in alone} == {"cmrc"}
    with pytest.raises(DataError):
        mix_sources({"cmrc": [], "distilled": []}, {"cmrc": 1, "distilled": 1}, total=10, seed=1)
    train, val = split_validation(mixed, 0.1, 1)
    assert len(val) == 4 and len(train) == 36 and not {id(r) for r in val} & {id(r) for r in train}


def test_stale_checkpoints_are_discarded(tmp_path):
    ckpt = tmp_path / "checkpoints"
    reset_if_stale(ckpt, "settings-a")
    (ckpt / "checkpoint-3").mkdir()
    reset_if_stale(ckpt, "settings-a")
    assert (ckpt / "checkpoint-3").exists()  # same settings: resumable
    reset_if_stale(ckpt, "settings-b")
    assert not (ckpt / "checkpoint-3").exists()  # e.g. after -S lr=1e-4: start afresh


def test_accelerate_command_and_committed_configs():
    from accelerate.commands.config.config_args import load_config_from_file

    cmd = accelerate_command(ROOT / "conf/accelerate/multi_gpu.yaml", "stages/sft.py")
    assert cmd == [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "conf/accelerate/multi_gpu.yaml"), "stages/sft.py",
    ]  # fmt: skip
    assert load_config_from_file(str(ROOT / "conf/accelerate/multi_gpu.yaml")).distributed_type == "MULTI_GPU"
    zero2 = load_config_from_file(str(ROOT / "conf/accelerate/deepspeed_zero2.yaml"))
    assert zero2.distributed_type == "DEEPSPEED" and zero2.deepspeed_config["zero_stage"] == 2
    params = yaml.safe_load(compose(["sft.launcher=accelerate"], config_dir=ROOT / "conf"))
    assert Path(ROOT / params["sft"]["accelerate_config"]).is_file()
    with pytest.raises(FileNotFoundError):
        accelerate_command("conf/accelerate/nope.yaml", "stages/sft.py")
    # the launcher itself accepts the command line (no GPU needed to parse it)
    help_text = subprocess.run(cmd[:3] + ["--help"], capture_output=True, text=True, timeout=120)
    assert "--config_file" in help_text.stdout


def test_curve_rows_merge_train_and_eval_logs():
    history = [
        {"loss": 2.0, "learning_rate": 1e-4, "step": 1},
        {"loss": 1.5, "learning_rate": 2e-4, "step": 2},
        {"eval_loss": 1.7, "step": 2},
        {"train_runtime": 3.0, "step": 2},
    ]
    assert curve_rows(history) == [
        {"step": 1, "loss": 2.0, "eval_loss": None, "lr": 1e-4},
        {"step": 2, "loss": 1.5, "eval_loss": 1.7, "lr": 2e-4},
    ]


def test_run_mean_loss_weights_each_log_by_its_steps_and_survives_a_resume():
    history = [
        {"loss": 3.0, "step": 2},  # covers steps 1-2
        {"eval_loss": 9.0, "step": 2},
        {"loss": 1.0, "step": 3},
        {"loss": 2.0, "step": 6},  # covers steps 4-6
    ]
    assert run_mean_loss(history) == pytest.approx((3.0 * 2 + 1.0 + 2.0 * 3) / 6)
    assert run_mean_loss([{"eval_loss": 1.0, "step": 1}]) is None


# --------------------------------------------------------------------------- the stage itself


def stage_folder(tmp_path: Path, base_generator: Path) -> Path:
    """A minimal project folder for stages/sft.py: base model, tiny CMRC set, no distilled set."""
    work = tmp_path / "project"
    (work / "models/base").mkdir(parents=True)
    (work / "models/base/generator").symlink_to(base_generator)
    (work / "data/prepared").mkdir(parents=True)
    chunks, questions = cmrc_questions(10)
    write_records(work / "data/prepared/kb.jsonl", chunks)
    write_records(work / "data/prepared/cmrc_train.jsonl", questions)
    params = yaml.safe_load(compose(["profile=smoke"], config_dir=ROOT / "conf"))
    params["lr"] = 2e-3
    params["sft"].update(max_samples=10, val_size=2, cutoff_len=128, max_steps=8, batch_size=2, save_steps=2)
    params["sft"]["eval_steps"] = 8
    params["teacher"] = {"api_key": "sk-should-never-be-logged"}  # not an sft key: must not reach MLflow
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    (work / "dvc.yaml").write_text("stages: {}\n")  # marks the project root for the tracking URI
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"],
        cwd=work,
        check=True,
    )
    return work


@pytest.mark.slow
def test_stage_resumes_after_kill_learns_and_is_tracked(tmp_path, base_generator):
    import mlflow
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = stage_folder(tmp_path, base_generator)
    db = f"sqlite:///{work / 'mlflow.db'}"
    env = project_env(MLFLOW_TRACKING_URI=db, DVC_EXP_NAME="exp-under-test", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "stages/sft.py")]

    first = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = work / "models/sft/checkpoints/checkpoint-2/trainer_state.json"
    deadline = time.time() + 600
    while not ckpt.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert ckpt.exists(), first.stderr.read().decode()[-3000:]
    assert not (work / "models/sft/adapter").exists()  # nothing half-written

    second = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stdout
    assert "training on CMRC alone" in second.stdout
    metrics = json.loads((work / "reports/sft/metrics.json").read_text())
    assert metrics["resumed_from_step"] >= 2 and metrics["steps"] == 8
    assert metrics["train_loss"] > 0  # over all 8 steps, not only those after the resume
    curves = (work / "reports/sft/curves.tsv").read_text().splitlines()
    assert curves[0].split("\t") == ["step", "loss", "eval_loss", "lr"]
    losses = [float(line.split("\t")[1]) for line in curves[1:] if line.split("\t")[1]]
    assert len(losses) == 8  # steps before the kill come from the checkpoint's history
    assert sum(losses[-2:]) < sum(losses[:2])  # loss goes down

    adapter = work / "models/sft/adapter"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in adapter.iterdir()}
    tok = AutoTokenizer.from_pretrained(str(base_generator))
    record = cmrc_records(3)[2]
    inputs = tok(apply_chat_template(tok, alpaca_user_text(record)), return_tensors="pt", add_special_tokens=False)
    base = AutoModelForCausalLM.from_pretrained(str(base_generator))
    with torch.no_grad():
        base_logits = base(**inputs).logits
        tuned = PeftModel.from_pretrained(base, str(adapter))
        tuned_logits = tuned(**inputs).logits
    assert (tuned_logits - base_logits).abs().max() > 1e-2

    mlflow.set_tracking_uri(db)
    runs = mlflow.search_runs(experiment_names=["ragtune"], filter_string="attributes.status = 'FINISHED'")
    assert len(runs) == 1
    run = mlflow.get_run(runs.iloc[0]["run_id"])
    assert run.data.tags["dvc.stage"] == "sft"
    assert run.data.tags["dvc.exp_name"] == "exp-under-test"
    assert len(run.data.tags["git.commit"]) == 40
    assert run.data.params["lr"] == "0.002" and run.data.params["model.lora_targets"] == "all-linear"
    assert run.data.params["sft.lora.r"] == "16"
    assert not any("sk-" in v or "api_key" in k for k, v in run.data.params.items())
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 9))
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'", output_format="list"
    )
    assert [m.name for m in models] == ["sft-adapter"]
    files = {f.path for f in mlflow.MlflowClient().list_logged_model_artifacts(models[0].model_id)}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files


# --------------------------------------------------------------------------- dvc exp run -S lr=1e-4

LR_DEPENDENT = {"sft", "package", "eval"}
LR_INDEPENDENT = {"fetch", "split", "distill", "embed_ft", "router", "package_base", "eval_base"}


def stages_run(output: str) -> set[str]:
    import re

    return set(re.findall(r"Running stage '([\w-]+)'", output))


@pytest.mark.slow
def test_exp_run_lr_reruns_only_what_depends_on_lr(tmp_path, mirror):
    """In a copy of the project (smoke sizes), `dvc exp run -S lr=1e-4` reruns sft and its consumers."""
    import shutil

    from tests.conftest import copy_project, run

    stages = set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    work = copy_project(tmp_path / "copy")
    for built in ("data/raw", "data/prepared", "models/base"):  # fetch/split outputs: reused, not rebuilt
        if (ROOT / built).exists():
            shutil.copytree(ROOT / built, work / built, symlinks=True, dirs_exist_ok=True)
    env = project_env(mirror, OMP_NUM_THREADS="1")
    run(["dvc", "exp", "run", "-S", "profile=smoke"], work, env, timeout=3600)  # the baseline
    second = run(["dvc", "exp", "run", "-S", "profile=smoke", "-S", "lr=1e-4"], work, env, timeout=3600)
    ran = stages_run(second.stdout + second.stderr)
    assert ran == LR_DEPENDENT & stages, second.stdout[-3000:]
    assert not ran & LR_INDEPENDENT
    assert yaml.safe_load((work / "params.yaml").read_text())["lr"] == 1e-4


# --------------------------------------------------------------------------- torn checkpoints, byte-stable adapters

TINY_LLAMA = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from peft import get_peft_model
from ragtune.training import LoraSettings, lora_config

def tiny_peft(targets="all-linear", seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = get_peft_model(LlamaForCausalLM(config), lora_config(LoraSettings(r=2, alpha=4, dropout=0.0), targets))
    with torch.no_grad():  # LoRA's B starts at zero: give the adapter weights worth comparing
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param))
    return model
"""


def tiny_peft(targets="all-linear", seed=0):
    """A two-layer LlamaForCausalLM from a small config (random weights, fixed seed) with a LoRA adapter."""
    namespace: dict = {}
    exec(TINY_LLAMA, namespace)
    return namespace["tiny_peft"](targets, seed)


def test_adapter_bytes_do_not_depend_on_the_hash_seed(tmp_path):
    """peft writes "all-linear"'s expanded target_modules in set order (PYTHONHASHSEED): an equal
    adapter must still be the same bytes, or `dvc status` reruns everything after sft."""
    script = TINY_LLAMA + "from ragtune.training import save_adapter\nsave_adapter(tiny_peft(), sys.argv[1])\n"
    folders = []
    for seed in ("1", "2"):
        folder = tmp_path / f"adapter-{seed}"
        env = project_env(PYTHONHASHSEED=seed, OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, "-c", script, str(folder)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        folders.append(folder)
    contents = [{p.name: p.read_bytes() for p in folder.iterdir()} for folder in folders]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(contents[0])
    for other in contents[1:]:
        assert set(other) == set(contents[0])
        for name in contents[0]:
            assert other[name] == contents[0][name], f"{name} differs between hash seeds"
    config = json.loads(contents[0]["adapter_config.json"])
    assert config["target_modules"] == sorted(config["target_modules"]) and len(config["target_modules"]) == 14
    # the safetensors header holds nothing that varies: peft's one metadata entry, tensors in a fixed order
    from safetensors import safe_open

    with safe_open(str(folders[0] / "adapter_model.safetensors"), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}


def test_canonical_safetensors_header_sorts_metadata_and_keeps_the_tensors(tmp_path):
    import struct

    import torch
    from safetensors.torch import load_file, save_file

    from ragtune.training import canonicalize_safetensors_header

    path = tmp_path / "w.safetensors"
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(5, dtype=torch.int64)}
    save_file(tensors, str(path), metadata={"format": "pt"})
    assert canonicalize_safetensors_header(path) is False  # one key: already canonical, untouched
    # a header whose metadata map came out unsorted, as a hash map may serialise it
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"] = {"zeta": "1", "format": "pt", "alpha": "2"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    assert canonicalize_safetensors_header(path) is True
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n % 8 == 0
    assert list(json.loads(path.read_bytes()[8 : 8 + n])["__metadata__"]) == ["alpha", "format", "zeta"]
    loaded = load_file(str(path))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items()) and set(loaded) == set(tensors)
    assert canonicalize_safetensors_header(path) is False


def test_torn_checkpoints_are_skipped_reported_and_never_resumed(tmp_path):
    import torch
    from peft import get_peft_model_state_dict

    from ragtune.training import last_checkpoint

    model = tiny_peft()
    expected = get_peft_model_state_dict(model).keys()
    ckpt = tmp_path / "checkpoints"
    reset_if_stale(ckpt, "fp")

    def checkpoint(step, model=model):
        folder = ckpt / f"checkpoint-{step}"
        model.save_pretrained(str(folder), safe_serialization=True)  # as the Trainer saves a peft model
        torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
        torch.save({"last_epoch": step}, folder / "scheduler.pt")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
        return folder

    checkpoint(2)  # complete
    (checkpoint(4) / "trainer_state.json").unlink()  # killed before the Trainer's last write
    weights = checkpoint(6) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # cut short
    (checkpoint(8) / "trainer_state.json").write_text('{"global_step": 8, "log_hist')  # torn JSON
    optimizer = checkpoint(10) / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    checkpoint(12, tiny_peft(targets=["q_proj"]))  # loads, but is not this adapter's tensors
    (ckpt / "checkpoint-14").mkdir()  # an empty folder: the save never started

    printed, skipped = [], []
    resume = last_checkpoint(ckpt, printed.append, expected_keys=expected, skipped=skipped)
    assert resume == str(ckpt / "checkpoint-2")
    assert [s["checkpoint"] for s in skipped] == [f"checkpoint-{n}" for n in (14, 12, 10, 8, 6, 4)]
    reasons = {s["checkpoint"]: s["reason"] for s in skipped}
    assert reasons["checkpoint-14"].startswith("no trainer_state.json")
    assert reasons["checkpoint-12"].startswith("adapter_model.safetensors does not hold this adapter's tensors")
    assert reasons["checkpoint-10"] == "optimizer.pt is truncated (not a whole torch archive)"
    assert reasons["checkpoint-8"].startswith("trainer_state.json does not parse")
    assert reasons["checkpoint-6"].startswith("adapter_model.safetensors does not load")
    assert reasons["checkpoint-4"].startswith("no trainer_state.json")
    assert printed[:-1] == [f"sft: skipping torn checkpoint {ckpt / s['checkpoint']}: {s['reason']}" for s in skipped]
    assert printed[-1] == f"sft: resuming from {ckpt / 'checkpoint-2'}"
    assert (ckpt / "checkpoint-6").exists()  # left in place: the Trainer overwrites it at that step

    (ckpt / "checkpoint-2" / "trainer_state.json").unlink()
    skipped.clear()
    assert last_checkpoint(ckpt, printed.append, expected_keys=expected, skipped=skipped) is None
    assert len(skipped) == 7


def test_a_torn_fingerprint_file_means_starting_afresh(tmp_path):
    ckpt = tmp_path / "checkpoints"
    reset_if_stale(ckpt, "fp")
    (ckpt / "checkpoint-3").mkdir()
    (ckpt / "ragtune_fingerprint.json").write_text('{"fingerpr')  # killed mid-write
    printed = []
    reset_if_stale(ckpt, "fp", printed.append)
    assert not (ckpt / "checkpoint-3").exists() and "starting afresh" in printed[0]
    assert json.loads((ckpt / "ragtune_fingerprint.json").read_text()) == {"fingerprint": "fp"}
