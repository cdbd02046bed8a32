"""Where models run and in which precision: one decision for every stage that runs a model.

`device: auto` is CUDA when torch sees a GPU, else the CPU. `dtype: auto` is bfloat16 on CUDA and on
a CPU with native bf16 (AVX512-BF16 or AMX: there bf16 matmuls run about twice as fast as fp32);
elsewhere float32, because a CPU without it emulates bf16 several times slower than fp32.
The decisions take their facts as arguments, so tests check them without a GPU.
"""

from __future__ import annotations

from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


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


def resolve_device(setting: str = "auto", *, has_cuda: bool | None = None) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; 'cuda'/'cuda:N' without a GPU is an error."""
    has_cuda = cuda_available() if has_cuda is None else has_cuda
    if setting == "auto":
        return "cuda" if has_cuda else "cpu"
    if setting.startswith("cuda") and not has_cuda:
        raise RuntimeError(f"device '{setting}' asked for, but torch sees no CUDA GPU (use device=auto or cpu)")
    return setting


def resolve_dtype(setting: str, device: str, *, native_bf16: bool | None = None) -> str:
    """'auto' -> 'bfloat16' on CUDA or a CPU with native bf16, else 'float32'; explicit names pass through
    (float16 on a CPU is refused: CPU kernels for it are slow or missing)."""
    if setting == "auto":
        if device.startswith("cuda"):
            return "bfloat16"
        return "bfloat16" if (cpu_has_native_bf16() if native_bf16 is None else native_bf16) else "float32"
    if setting not in DTYPES:
        raise ValueError(f"dtype '{setting}' is not one of auto, {', '.join(DTYPES)}")
    if setting == "float16" and device == "cpu":
        raise ValueError("dtype float16 on the CPU: use bfloat16 (native bf16 CPUs) or float32")
    return setting


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def placement(device_setting: str = "auto", dtype_setting: str = "auto") -> tuple[str, str]:
    """(device, dtype name) for this machine."""
    device = resolve_device(device_setting)
    return device, resolve_dtype(dtype_setting, device)
