"""Where models run and in which precision (ragtune.devices), decided without a GPU: the facts (CUDA
present, native bf16, GPU count, the environment) are injected. Also what the Trainer gets from
those decisions, the single-GPU pin for training, the accelerate launcher for several processes,
`sft.quantization=4bit` refused at once where it cannot run, and the CLI's --device/--dtype."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ragtune.config import UserError, compose
from ragtune.devices import (
    DeviceError,
    accelerate_command,
    cpu_has_native_bf16,
    pin_training_gpu,
    placement,
    resolve_device,
    resolve_dtype,
    training_precision,
)
from ragtune.training import (
    SftConfig,
    bnb_4bit_config,
    check_quantization,
    training_arguments,
)
from tests.conftest import ROOT, project_env

# --------------------------------------------------------------------------- device and dtype


@pytest.mark.parametrize(("setting", "has_cuda", "count", "expected"), [
    ("auto", True, 1, "cuda"),
    ("auto", False, 0, "cpu"),
    ("cpu", True, 1, "cpu"),  # asked for: the CPU even with a GPU present
    ("cuda", True, 1, "cuda"),
    ("cuda:1", True, 2, "cuda:1"),
])
def test_resolve_device(setting, has_cuda, count, expected):
    assert resolve_device(setting, has_cuda=has_cuda, device_count=count) == expected


def test_a_rank_of_a_distributed_launch_uses_its_own_gpu():
    rank3 = {"LOCAL_RANK": "3", "WORLD_SIZE": "8"}
    assert resolve_device("auto", has_cuda=True, environ=rank3) == "cuda:3"
    assert resolve_device("cuda", has_cuda=True, environ=rank3) == "cuda:3"
    assert resolve_device("auto", has_cuda=False, environ=rank3) == "cpu"  # cpu_ddp.yaml: ranks on the CPU
    assert resolve_device("auto", has_cuda=True, environ={}) == "cuda"


@pytest.mark.parametrize(("setting", "has_cuda", "count", "message"), [
    ("cuda", False, 0, "torch sees no CUDA GPU"),
    ("cuda:0", False, 0, "torch sees no CUDA GPU"),
    ("cuda:2", True, 2, "sees 2 GPU"),
    ("tpu", True, 1, "not one of auto, cpu, cuda, cuda:N"),
])
def test_impossible_devices_are_one_clear_user_error(setting, has_cuda, count, message):
    with pytest.raises(DeviceError, match=message) as err:
        resolve_device(setting, has_cuda=has_cuda, device_count=count)
    assert isinstance(err.value, UserError)


@pytest.mark.parametrize(("setting", "device", "native_bf16", "expected"), [
    ("auto", "cuda", False, "bfloat16"),
    ("auto", "cuda:1", False, "bfloat16"),
    ("auto", "cpu", True, "bfloat16"),  # AVX512-BF16 / AMX
    ("auto", "cpu", False, "float32"),  # AVX2 only: bf16 would be emulated, several times slower
    ("float32", "cuda", True, "float32"),
    ("bfloat16", "cpu", False, "bfloat16"),  # asked for: allowed, only slow
    ("float16", "cuda", False, "float16"),
])
def test_resolve_dtype(setting, device, native_bf16, expected):
    assert resolve_dtype(setting, device, native_bf16=native_bf16) == expected


def test_impossible_dtypes_are_refused():
    with pytest.raises(DeviceError, match="float16 on the CPU"):
        resolve_dtype("float16", "cpu", native_bf16=True)
    with pytest.raises(DeviceError, match="not one of"):
        resolve_dtype("int8", "cuda")


def test_native_bf16_is_read_from_the_cpu_flags():
    assert cpu_has_native_bf16("flags : fpu avx2 avx512f avx512_bf16")
    assert cpu_has_native_bf16("flags : fpu amx_bf16 amx_tile")
    assert not cpu_has_native_bf16("flags : fpu sse4_2 avx2 fma")


def test_this_machine_resolves_consistently():
    device, dtype = placement("auto", "auto")
    assert device == resolve_device("auto") and dtype == resolve_dtype("auto", device)


# --------------------------------------------------------------------------- what the Trainer gets


@pytest.mark.parametrize(("device", "dtype", "bf16", "fp16", "use_cpu"), [
    ("cpu", "float32", False, False, True),
    ("cpu", "bfloat16", True, False, True),  # native-bf16 CPU: autocast on the CPU
    ("cuda", "bfloat16", True, False, False),
    ("cuda", "float16", False, True, False),
    ("cuda", "float32", False, False, False),
])
def test_trainer_gets_bf16_and_use_cpu_right(device, dtype, bf16, fp16, use_cpu, monkeypatch, tmp_path):
    import transformers.training_args as ta

    assert training_precision(device, dtype) == {"bf16": bf16, "fp16": fp16, "use_cpu": use_cpu}
    if not use_cpu:  # transformers refuses GPU bf16 without a GPU: pretend one, only the flags matter here
        monkeypatch.setattr(ta, "is_torch_bf16_gpu_available", lambda: True)
    args = training_arguments(SftConfig(), lr=1e-4, seed=0, output_dir=tmp_path, has_eval=False, device=device,
                              dtype=dtype)
    assert (args.bf16, args.fp16, args.use_cpu) == (bf16, fp16, use_cpu)


def test_one_training_process_is_pinned_to_one_gpu():
    env: dict[str, str] = {}
    assert pin_training_gpu("cpu", env) == "cpu" and env == {}
    assert pin_training_gpu("auto", env) == "auto" and env == {"CUDA_VISIBLE_DEVICES": "0"}
    env = {}
    assert pin_training_gpu("cuda:2", env) == "cuda" and env["CUDA_VISIBLE_DEVICES"] == "2"
    env = {"CUDA_VISIBLE_DEVICES": "4,5,6"}  # indices count in the visible list
    assert pin_training_gpu("cuda:1", env) == "cuda" and env["CUDA_VISIBLE_DEVICES"] == "5"
    with pytest.raises(DeviceError, match="lists 3 GPU"):
        pin_training_gpu("cuda:3", {"CUDA_VISIBLE_DEVICES": "4,5,6"})
    env = {"CUDA_VISIBLE_DEVICES": ""}  # deliberately no GPU: left alone (resolve_device says so)
    assert pin_training_gpu("cuda", env) == "cuda" and env == {"CUDA_VISIBLE_DEVICES": ""}
    env = {"LOCAL_RANK": "1", "WORLD_SIZE": "8"}  # a rank under accelerate/torchrun: its launcher decides
    assert pin_training_gpu("cuda:3", env) == "cuda:3" and "CUDA_VISIBLE_DEVICES" not in env


# --------------------------------------------------------------------------- several processes


def test_cpu_ddp_config_starts_two_gloo_processes():
    from accelerate.commands.config.config_args import load_config_from_file

    config = ROOT / "conf/accelerate/cpu_ddp.yaml"
    loaded = load_config_from_file(str(config))
    assert (loaded.distributed_type, loaded.num_processes, loaded.use_cpu, loaded.mixed_precision) == \
        ("MULTI_CPU", 2, True, "no")
    cmd = accelerate_command(config, "stages/sft.py")
    # accelerate runs a MULTI_CPU config as ONE process unless told to use its torchrun launcher
    assert cmd[cmd.index("--config_file") + 2] == "--multi_gpu" and cmd[-1] == "stages/sft.py"
    assert "--multi_gpu" not in accelerate_command(ROOT / "conf/accelerate/multi_gpu.yaml", "stages/sft.py")
    params = yaml.safe_load(compose(["sft.launcher=accelerate", "sft.accelerate_config=conf/accelerate/cpu_ddp.yaml",
                                     "embed_ft.launcher=accelerate",
                                     "embed_ft.accelerate_config=conf/accelerate/cpu_ddp.yaml"], config_dir=ROOT / "conf"))
    assert params["embed_ft"]["launcher"] == "accelerate" and params["sft"]["launcher"] == "accelerate"
    from ragtune.config import Params
    from ragtune.params import validate_all

    validate_all(Params(params))


# --------------------------------------------------------------------------- QLoRA


def test_4bit_is_refused_where_it_cannot_run():
    check_quantization("none", "cpu", has_cuda=False, has_bitsandbytes=False)  # nothing to check
    with pytest.raises(UserError, match="needs a CUDA GPU and this machine has none"):
        check_quantization("4bit", "cpu", has_cuda=False, has_bitsandbytes=True)
    with pytest.raises(UserError, match="device is 'cpu'"):
        check_quantization("4bit", "cpu", has_cuda=True, has_bitsandbytes=True)
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        check_quantization("4bit", "cuda", has_cuda=True, has_bitsandbytes=False)
    check_quantization("4bit", "cuda:0", has_cuda=True, has_bitsandbytes=True)  # a GPU and bitsandbytes: fine
    assert SftConfig(quantization="4bit").quantization == "4bit"
    with pytest.raises(ValueError):
        SftConfig(quantization="8bit")


def test_4bit_is_qlora():
    import torch

    config = bnb_4bit_config()
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16


def test_sft_stage_with_4bit_stops_at_once_on_this_machine(tmp_path):
    """No CUDA here (nor bitsandbytes): one line, exit code 1, before reading any data or model (the
    folder has neither, so anything loaded would fail differently)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: 4bit may run here")
    params = yaml.safe_load(compose(["profile=smoke", "sft.quantization=4bit"], config_dir=ROOT / "conf"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "stages/sft.py")], cwd=tmp_path, env=project_env(),
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    expected = ("sft: sft.quantization=4bit (QLoRA) needs a CUDA GPU and this machine has none: "
                "use sft.quantization=none here")
    assert lines == [expected], proc.stderr[-2000:]
    assert not (tmp_path / "models").exists() and not (tmp_path / "mlflow.db").exists()
    print(f"\n4bit refused after {time.monotonic() - started:.1f} s (imports included)")


# --------------------------------------------------------------------------- the CLI


def test_cli_device_and_dtype_come_from_flags_then_params_then_auto(tmp_path, monkeypatch):
    from ragtune import cli
    from ragtune.bundle import Bundle

    seen: list[tuple[str, str]] = []

    def fake_load(cls, folder, generator=None, base_dir=None, verify="size", *, device="?", dtype="?", batch_size=8):
        seen.append((device, dtype))
        raise UserError("stop here")

    monkeypatch.setattr(Bundle, "load", classmethod(fake_load))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["ask", "q", "--bundle", "b"]) == 1  # no params.yaml: auto
    assert seen[-1] == placement("auto", "auto")
    Path("params.yaml").write_text(yaml.safe_dump({"device": "cpu", "dtype": "bfloat16"}))
    assert cli.main(["ask", "q", "--bundle", "b"]) == 1
    assert seen[-1] == ("cpu", "bfloat16")
    assert cli.main(["ask", "q", "--bundle", "b", "--dtype", "float32"]) == 1
    assert seen[-1] == ("cpu", "float32")
    assert cli.main(["chat", "b", "--device", "cpu", "--dtype", "float32"]) == 1
    assert seen[-1] == ("cpu", "float32")
    serve = cli.build_parser().parse_args(["serve", "b", "--device", "cuda:1", "--dtype", "bfloat16"])
    assert (serve.device, serve.dtype) == ("cuda:1", "bfloat16")
