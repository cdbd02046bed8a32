"""ragtune export: the LoRA adapter merged into its base as a standalone folder, checked by logits.

The real SmolLM2 with a random adapter (lora_B drawn at random, so the adapter changes the logits a
lot) for the parity figure and the greedy tokens; a tiny random Llama with SmolLM2's tokenizer for
the failure paths, the CLI and a bfloat16 save."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragtune.export import (
    FLOAT32_TOLERANCE,
    PROMPTS,
    REPORT,
    ExportError,
    check_inputs,
    export_merged,
)

MERGED_FILES = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                REPORT}


def random_adapter(model, out: Path, r: int, std: float, seed: int = 0) -> Path:
    """`model` with a LoRA adapter on every linear layer whose B is random (peft starts it at zero), saved."""
    import torch
    from peft import get_peft_model

    from ragtune.training import LoraSettings, lora_config, save_adapter

    torch.manual_seed(seed)
    peft = get_peft_model(model, lora_config(LoraSettings(r=r, alpha=2 * r, dropout=0.0), "all-linear"))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, std)
    save_adapter(peft, out)
    return out


@pytest.fixture(scope="module")
def smollm_adapter(base_generator, tmp_path_factory) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_generator), dtype=torch.float32)
    return random_adapter(model, tmp_path_factory.mktemp("smollm") / "adapter", r=8, std=0.02)


@pytest.fixture(scope="module")
def tiny(base_generator, tmp_path_factory) -> tuple[Path, Path]:
    """(base, adapter): a 2-layer random Llama with SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = AutoTokenizer.from_pretrained(str(base_generator))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(str(folder / "base"))
    tokenizer.save_pretrained(str(folder / "base"))
    base = LlamaForCausalLM.from_pretrained(str(folder / "base"), dtype=torch.float32)
    return folder / "base", random_adapter(base, folder / "adapter", r=2, std=0.5)


@pytest.mark.slow  # ~100 s on 2 shared cores: SmolLM2 loaded five times, saved once (538 MB)
def test_merged_smollm2_matches_base_plus_adapter_and_generates_the_same_tokens(base_generator, smollm_adapter,
                                                                                   tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragtune.export import _logits, _max_diff
    from ragtune.inference import TransformersGenerator

    out = tmp_path / "models" / "merged"
    lines: list[str] = []
    report = export_merged(base_generator, smollm_adapter, out, print_fn=lines.append)
    print("\n" + "\n".join(lines))
    assert report["max_abs_logit_diff"] < FLOAT32_TOLERANCE
    assert report["dtype"] == "float32" and report["top1_agreement"] == 1.0
    assert any("max |logit difference|" in line for line in lines)
    assert json.loads((out / REPORT).read_text()) == report
    names = {p.name for p in out.iterdir()}
    assert MERGED_FILES <= names and "adapter_config.json" not in names
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".merged.")]  # no temporary folder left

    # The check has power: the adapter moves the logits far more than the tolerance.
    tokenizer = AutoTokenizer.from_pretrained(str(base_generator))
    plain = AutoModelForCausalLM.from_pretrained(str(base_generator), dtype=torch.float32).eval()
    adapter_effect, _ = _max_diff(_logits(plain, tokenizer, PROMPTS, "cpu"),
                                  _logits(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval(),
                                          tokenizer, PROMPTS, "cpu"))
    print(f"the adapter itself moves the logits by up to {adapter_effect:.3g}")
    assert adapter_effect > 1000 * FLOAT32_TOLERANCE

    # Plain transformers loads the folder; greedy decoding gives base + adapter's tokens.
    questions = [PROMPTS[0], "上海在哪个国家？"]
    merged = TransformersGenerator(out).generate(questions, 12)
    unmerged = TransformersGenerator(base_generator, smollm_adapter, merge_adapter=False).generate(questions, 12)
    assert merged == unmerged and all(merged)


def test_a_failed_check_writes_nothing_and_keeps_the_previous_export(tiny, tmp_path):
    base, adapter = tiny
    out = tmp_path / "merged"
    first = export_merged(base, adapter, out, print_fn=lambda _: None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ExportError, match="differ from base \\+ adapter"):
        export_merged(base, adapter, out, tolerance=-1.0, print_fn=lambda _: None)  # no merge can pass
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no half folder beside it
    assert first["max_abs_logit_diff"] < FLOAT32_TOLERANCE

    fresh = tmp_path / "never"
    with pytest.raises(ExportError):
        export_merged(base, adapter, fresh, tolerance=-1.0, print_fn=lambda _: None)
    assert not fresh.exists()


def test_refuses_to_replace_its_inputs_or_a_folder_it_did_not_write(tiny, tmp_path):
    base, adapter = tiny
    for out in (base, adapter, base.parent):
        with pytest.raises(ExportError, match="would replace"):
            check_inputs(base, adapter, out)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an earlier `ragtune export`"):
        export_merged(base, adapter, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ExportError, match="not a peft adapter"):
        check_inputs(base, tmp_path, tmp_path / "out")
    with pytest.raises(ExportError, match="not a Hugging Face model"):
        check_inputs(tmp_path, adapter, tmp_path / "out")


def test_bfloat16_export_is_checked_against_what_bf16_already_costs(tiny, tmp_path):
    from safetensors import safe_open

    base, adapter = tiny
    report = export_merged(base, adapter, tmp_path / "bf16", dtype="bfloat16", print_fn=lambda _: None)
    assert report["dtype"] == "bfloat16"
    assert report["unmerged_low_precision_diff"] > 0
    assert report["max_abs_logit_diff"] <= report["tolerance"]
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as fh:
        assert {str(fh.get_slice(k).get_dtype()) for k in fh.keys()}  # noqa: SIM118 == {"BF16"}


def test_cli_export_prints_the_parity_figure(tiny, tmp_path, capsys, monkeypatch):
    from ragtune import cli

    base, adapter = tiny
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the device is auto
    assert cli.main(["export", "--base", str(base), "--adapter", str(adapter), "--out", "out", "--device", "cpu"]) == 0
    assert "max |logit difference|" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / REPORT).read_text())["device"] == "cpu"
    assert cli.main(["export", "--base", str(base), "--adapter", str(tmp_path), "--out", "x"]) == 1
    assert "not a peft adapter" in capsys.readouterr().err
