"""GPU smoke test: device placement, bf16 generation, a LoRA train step and the merge parity on CUDA,
with a tiny Llama built from a config here (random weights, nothing downloaded), and the embedder's
fine-tune and dense retrieval on CUDA with a tiny BERT built the same way. Skips without CUDA.

Self-contained for a bare GPU machine (no ragtune data, no internet): it needs only torch,
transformers, peft, accelerate, safetensors, tokenizers, pydantic, pyyaml, sentence-transformers,
datasets and pytest, and imports only ragtune modules that need no more (ragtune.devices, .inference,
.training, .export, .embedding, .retrieval; no mlflow, dvc, bm25s, jieba, nltk or fastapi). The tokenizer is SmolLM2's when
models/base/generator is there, else a character-level `tokenizers` WordLevel one with a chat
template.

    python -m pytest tests/test_gpu.py -v
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
RECORDS = [{"instruction": f"What colour is box {i}?", "input": "", "output": colour}
           for i, colour in enumerate(["red", "blue", "green", "yellow"])]


def save_tokenizer(folder: Path) -> None:
    """SmolLM2's tokenizer when the workspace has it, else a character-level one built here."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    smollm = ROOT / "models" / "base" / "generator"
    if (smollm / "tokenizer.json").is_file():
        AutoTokenizer.from_pretrained(str(smollm)).save_pretrained(str(folder))
        return
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from ragtune.export import PROMPTS
    from ragtune.prompts import alpaca_user_text

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    text = "".join(PROMPTS) + "".join(alpaca_user_text(r) + r["output"] for r in RECORDS) + CHAT_TEMPLATE
    chars = sorted(set(string.printable) | set(text))
    vocab = {token: i for i, token in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer LlamaForCausalLM (hidden 64) with random weights, saved in float32 with its tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_llama")
    save_tokenizer(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    return folder


def test_device_placement_is_cuda_and_bf16():
    from ragtune.devices import (
        placement,
        resolve_device,
        resolve_dtype,
        training_precision,
    )

    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:0") == "cuda:0"
    assert resolve_dtype("auto", "cuda") == "bfloat16"
    assert placement("auto", "auto") == ("cuda", "bfloat16")
    assert training_precision("cuda", "bfloat16") == {"bf16": True, "fp16": False, "use_cpu": False}


def test_bf16_generation_on_cuda(tiny_llama):
    from ragtune.devices import placement
    from ragtune.inference import TransformersGenerator

    device, dtype = placement("auto", "auto")
    generator = TransformersGenerator(tiny_llama, device=device, dtype=dtype, batch_size=4)
    params = list(generator.model.parameters())
    assert all(p.device.type == "cuda" for p in params) and all(p.dtype == torch.bfloat16 for p in params)
    questions = ["What colour is box 1?", "Tom has 3 apples and buys 5 more.", "hi", "A longer question, with more words?"]
    answers = generator.generate_detailed(questions, 8)
    assert len(answers) == 4 and all(0 < a.completion_tokens <= 8 for a in answers)
    assert "".join(generator.stream("hi", 8)) == generator.generate(["hi"], 8)[0]  # one prompt: no padding either way


def test_lora_train_step_on_cuda_in_bf16(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    from ragtune.training import LoraSettings, SftConfig, train_lora

    cfg = SftConfig(max_samples=4, val_size=0, cutoff_len=512, max_steps=2, batch_size=2, grad_accum=1, warmup=0,
                    logging_steps=1, save_steps=100, eval_steps=100, group_by_length=False,
                    lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    result = train_lora(base_model_dir=tiny_llama, train_records=RECORDS, val_records=[], cfg=cfg, lr=1e-2, seed=0,
                        lora_targets="all-linear", checkpoint_dir=tmp_path / "checkpoints",
                        adapter_dir=tmp_path / "adapter", run_fingerprint="gpu-smoke", device="cuda", dtype="bfloat16")
    metrics = result["metrics"]
    assert metrics["steps"] == 2 and metrics["bf16"] is True and metrics["world_size"] == 1
    assert metrics["train_examples"] == 4 and metrics["last_loss"] == metrics["last_loss"]  # trained, not NaN
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert any(float(w.abs().max()) > 0 for k, w in weights.items() if "lora_B" in k)  # B moved from zero


def random_adapter(base: Path, out: Path, std: float = 0.5) -> Path:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from ragtune.training import LoraSettings, lora_config, save_adapter

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                           lora_config(LoraSettings(r=4, alpha=8, dropout=0.0), "all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, std)
    save_adapter(model, out)
    return out


def test_merge_parity_on_cuda(tiny_llama, tmp_path):
    from ragtune.export import FLOAT32_TOLERANCE, REPORT, export_merged
    from ragtune.inference import TransformersGenerator

    adapter = random_adapter(tiny_llama, tmp_path / "adapter")
    lines: list[str] = []
    report = export_merged(tiny_llama, adapter, tmp_path / "merged", device="cuda", print_fn=lines.append)
    print("\n" + "\n".join(lines))
    assert report["device"] == "cuda" and report["dtype"] == "float32"
    assert report["max_abs_logit_diff"] < FLOAT32_TOLERANCE and report["top1_agreement"] == 1.0
    assert json.loads((tmp_path / "merged" / REPORT).read_text())["max_abs_logit_diff"] == report["max_abs_logit_diff"]
    low = export_merged(tiny_llama, adapter, tmp_path / "merged_bf16", device="cuda", dtype="bfloat16",
                        print_fn=lines.append)
    print(lines[-2])
    assert low["max_abs_logit_diff"] <= low["tolerance"]
    merged = TransformersGenerator(tmp_path / "merged", device="cuda", dtype="bfloat16")
    unmerged = TransformersGenerator(tiny_llama, adapter, device="cuda", dtype="bfloat16", merge_adapter=False)
    assert merged.generate(["hi"], 6)[0] is not None and unmerged.generate(["hi"], 6)[0] is not None


def test_4bit_needs_bitsandbytes_or_trains(tiny_llama, tmp_path):
    import importlib.util

    from ragtune.config import UserError
    from ragtune.training import LoraSettings, SftConfig, check_quantization, train_lora

    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(UserError, match="pip install bitsandbytes"):
            check_quantization("4bit", "cuda")
        return
    cfg = SftConfig(quantization="4bit", max_samples=4, val_size=0, cutoff_len=512, max_steps=1, batch_size=2,
                    grad_accum=1, warmup=0, save_steps=100, eval_steps=100, group_by_length=False,
                    lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    result = train_lora(base_model_dir=tiny_llama, train_records=RECORDS, val_records=[], cfg=cfg, lr=1e-3, seed=0,
                        lora_targets="all-linear", checkpoint_dir=tmp_path / "ck", adapter_dir=tmp_path / "ad",
                        run_fingerprint="qlora", device="cuda", dtype="bfloat16")
    assert result["metrics"]["steps"] == 1 and result["metrics"]["quantization"] == "4bit"


def tiny_sentence_transformer(folder: Path) -> Path:
    """A 2-layer BERT (hidden 32) with a character-level WordPiece vocabulary, saved as a folder that
    sentence-transformers loads with mean pooling."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    texts = "".join(TRIPLE_TEXTS) + string.printable
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(texts) - set(string.whitespace))]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=False).save_pretrained(str(folder))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=128)
    BertModel(config).save_pretrained(str(folder))
    return folder


TRIPLE_TEXTS = ["战国无双3由光荣和ω-force开发。", "黄独是一种植物。", "北京是中国的首都。", "the box is red", "the sky is blue"]


def test_embedder_fine_tune_and_dense_retrieval_on_cuda(tmp_path):
    """embed_ft's trainer and the dense retriever run on the GPU when the device says so."""
    from ragtune.embedding import EmbedFtConfig, fine_tune
    from ragtune.records import Triple
    from ragtune.retrieval import DenseIndex, load_embedder

    model = load_embedder(tiny_sentence_transformer(tmp_path / "bert"), "cuda")
    assert all(p.device.type == "cuda" for p in model.parameters())
    rows = [Triple(query=f"问题{i}：{text[:4]}？", pos=[text], neg=[TRIPLE_TEXTS[(i + 1) % len(TRIPLE_TEXTS)]], prompt="")
            for i, text in enumerate(TRIPLE_TEXTS)]
    before = [p.detach().clone() for p in model.parameters()]
    cfg = EmbedFtConfig(max_samples=len(rows), negatives=1, batch_size=2, max_steps=2, lr=1e-3, max_seq_length=32, logging_steps=1)
    summary = fine_tune(model, rows, cfg, work_dir=tmp_path / "work", seed=0, device="cuda")
    assert summary["steps"] == 2 and summary["train_loss"] == summary["train_loss"]  # trained, not NaN
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.device.type == "cuda" for p in model.parameters())
    index = DenseIndex([f"c{i}" for i in range(len(TRIPLE_TEXTS))], TRIPLE_TEXTS, model, batch_size=4)
    hits = index.retrieve_many(["北京是中国的首都。", "the box is red"], 2)
    assert [len(h) for h in hits] == [2, 2] and hits[0][0] == ("c2", pytest.approx(1.0, abs=1e-3))
