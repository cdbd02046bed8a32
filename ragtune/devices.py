"""Where models run and in which precision: one decision for every stage that runs a model.

`device: auto` is CUDA when torch sees a GPU, else the CPU. `dtype: auto` is bfloat16 on CUDA and on
a CPU with native bf16 (AVX512-BF16 or AMX: there bf16 matmuls run about twice as fast as fp32);
elsewhere float32, because a CPU without it emulates bf16 several times slower than fp32.
The decisions take their facts as arguments, so tests check them without a GPU.

Who uses them: sft and embed_ft (training: `training_precision` gives the Trainer's bf16/fp16/use_cpu),
the dense retriever (its SentenceTransformer), eval (generation and the similarity model), the
bundle, `ragtune serve/chat/ask --device/--dtype` and `ragtune export --device`.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import MutableMapping, Sequence
from pathlib import Path

from ragtune.config import UserError

DTYPES = ("float32", "bfloat16", "float16")
_CUDA_N = re.compile(r"^cuda(?::(\d+))?$")


class DeviceError(UserError, ValueError):
    """A device or dtype this machine cannot give (one line for the user, no traceback)."""


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """AVX512-BF16 or AMX in /proc/cpuinfo's flags (False where the file cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return "avx512_bf16" in cpuinfo or "amx_bf16" in cpuinfo


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(setting: str = "auto", *, has_cuda: bool | None = None, device_count: int | None = None,
                   environ: MutableMapping[str, str] | None = None) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; 'cuda'/'cuda:N' without a GPU (or without GPU N)
    is an error that says what to set instead. In a rank of a distributed launch, 'auto'/'cuda' is that
    rank's GPU (cuda:LOCAL_RANK), as the Trainer places it: what else the stage loads goes there too."""
    if setting != "cpu" and setting != "auto" and not _CUDA_N.match(setting):
        raise DeviceError(f"device '{setting}' is not one of auto, cpu, cuda, cuda:N")
    has_cuda = cuda_available() if has_cuda is None else has_cuda
    environ = os.environ if environ is None else environ
    if setting in ("auto", "cuda") and has_cuda and under_distributed_launcher(environ):
        return f"cuda:{int(environ['LOCAL_RANK'])}"
    if setting == "auto":
        return "cuda" if has_cuda else "cpu"
    if setting.startswith("cuda"):
        if not has_cuda:
            raise DeviceError(f"device '{setting}' asked for, but torch sees no CUDA GPU (use device=auto or cpu)")
        index = _CUDA_N.match(setting).group(1)
        if index is not None:
            count = cuda_device_count() if device_count is None else device_count
            if int(index) >= count:
                raise DeviceError(f"device '{setting}' asked for, but torch sees {count} GPU(s) (cuda:0..cuda:{count - 1})")
    return setting


def resolve_dtype(setting: str, device: str, *, native_bf16: bool | None = None) -> str:
    """'auto' -> 'bfloat16' on CUDA or a CPU with native bf16, else 'float32'; explicit names pass through
    (float16 on a CPU is refused: CPU kernels for it are slow or missing)."""
    if setting == "auto":
        if device.startswith("cuda"):
            return "bfloat16"
        return "bfloat16" if (cpu_has_native_bf16() if native_bf16 is None else native_bf16) else "float32"
    if setting not in DTYPES:
        raise DeviceError(f"dtype '{setting}' is not one of auto, {', '.join(DTYPES)}")
    if setting == "float16" and device == "cpu":
        raise DeviceError("dtype float16 on the CPU: use bfloat16 (native bf16 CPUs) or float32")
    return setting


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def placement(device_setting: str = "auto", dtype_setting: str = "auto") -> tuple[str, str]:
    """(device, dtype name) for this machine."""
    device = resolve_device(device_setting)
    return device, resolve_dtype(dtype_setting, device)


def training_precision(device: str, dtype: str) -> dict[str, bool]:
    """The Trainer's precision and placement flags for a resolved (device, dtype): weights stay fp32 and
    bfloat16/float16 turn on autocast; `use_cpu` keeps a CPU run off any GPU (and off accelerate's GPU
    path under a launcher)."""
    return {"bf16": dtype == "bfloat16", "fp16": dtype == "float16", "use_cpu": device == "cpu"}


def under_distributed_launcher(environ: MutableMapping[str, str] | None = None) -> bool:
    """True inside a process started by torchrun / accelerate launch (each rank picks its own GPU)."""
    environ = os.environ if environ is None else environ
    return "LOCAL_RANK" in environ and int(environ.get("WORLD_SIZE", "1")) > 1


def pin_training_gpu(setting: str, environ: MutableMapping[str, str] | None = None) -> str:
    """For a single-process training run: make exactly one GPU visible (CUDA_VISIBLE_DEVICES) and return
    the device setting to resolve from then on.

    Without it, transformers' Trainer spreads one process over every visible GPU with
    nn.DataParallel (per-device batch x GPUs, slow for LoRA) and ignores an index (`cuda:1` trains on
    cuda:0). 'cuda:N' keeps GPU N (counted in an existing CUDA_VISIBLE_DEVICES list) and becomes 'cuda';
    'auto'/'cuda' keep the first visible GPU; 'cpu' changes nothing. Under a distributed launcher
    (several GPUs on purpose: `launcher=accelerate`) nothing changes. Must run before CUDA is
    initialised in this process (it is not, by importing torch)."""
    environ = os.environ if environ is None else environ
    match = _CUDA_N.match(setting)
    if setting == "cpu" or under_distributed_launcher(environ) or (setting != "auto" and not match):
        return setting
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # too late to change what CUDA sees
        return setting
    index = int(match.group(1)) if match and match.group(1) is not None else 0
    visible = [v.strip() for v in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if "CUDA_VISIBLE_DEVICES" in environ and not visible:
        return setting  # deliberately no GPU: resolve_device says so
    if visible:
        if index >= len(visible):
            raise DeviceError(f"device '{setting}' asked for, but CUDA_VISIBLE_DEVICES lists {len(visible)} GPU(s)")
        environ["CUDA_VISIBLE_DEVICES"] = visible[index]
    else:
        environ["CUDA_VISIBLE_DEVICES"] = str(index)
    return "auto" if setting == "auto" else "cuda"


# --------------------------------------------------------------------------- several processes (accelerate)

UNDER_ACCELERATE = "RAGTUNE_UNDER_ACCELERATE"
LAUNCHER_PID = "RAGTUNE_LAUNCHER_PID"  # the stage process that started `accelerate launch`


def accelerate_command(config_file: str | os.PathLike, script: str | os.PathLike, python: str | None = None) -> list[str]:
    """`accelerate launch --config_file <config> <script>` run with this interpreter (so the venv's
    accelerate, whatever PATH says).

    A MULTI_CPU config without an mpirun hostfile gets `--multi_gpu`, accelerate's name for its
    torchrun launcher: without it accelerate starts ONE process for a MULTI_CPU config (it expects
    mpirun to start the others), so `num_processes: 2` would silently train alone."""
    import yaml

    config_file = Path(config_file)
    if not config_file.is_file():
        raise FileNotFoundError(f"accelerate config {config_file} not found (see conf/accelerate/)")
    config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    extra = []
    if (config.get("distributed_type") == "MULTI_CPU" and int(config.get("num_processes") or 1) > 1
            and not config.get("mpirun_config")):
        extra = ["--multi_gpu"]
    return [
        python or sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_file),
        *extra,
        str(script),
    ]


def under_accelerate() -> bool:
    return os.environ.get(UNDER_ACCELERATE) == "1"


def relaunch_under_accelerate(stage: str, config_file: str | os.PathLike, script: str | os.PathLike,
                              argv: Sequence[str]) -> int:
    """Run `script argv` again under `accelerate launch` and return its exit code. The ranks know who
    launched them (LAUNCHER_PID), so that a kill -9 of this process stops them too (`exit_with_launcher`):
    torchrun starts each rank in a session of its own, where no signal to this one reaches them."""
    import subprocess

    cmd = accelerate_command(config_file, script) + list(argv)
    print(f"{stage}:", " ".join(cmd), flush=True)
    env = {**os.environ, UNDER_ACCELERATE: "1", LAUNCHER_PID: str(os.getpid())}
    return subprocess.call(cmd, env=env)


def exit_with_launcher(stage: str, interval: float = 1.0) -> None:
    """In a rank started by `relaunch_under_accelerate`: a daemon thread that ends this process (exit
    code 1) once the launching stage process or this rank's parent (the torchrun agent) is gone, so
    that no orphaned rank keeps training and writing checkpoints beside a rerun."""
    import threading
    import time

    launcher = int(os.environ.get(LAUNCHER_PID) or 0)
    parent = os.getppid()

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:  # killed but not yet reaped by its parent: a zombie answers signal 0
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return True

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent or (launcher and not alive(launcher)):
                print(f"{stage}: rank {os.environ.get('RANK', '?')}: the launcher is gone; stopping", file=sys.stderr,
                      flush=True)
                os._exit(1)

    threading.Thread(target=watch, name="exit-with-launcher", daemon=True).start()
