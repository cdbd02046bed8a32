"""vLLM as a managed engine: the `vllm serve` command for a base model and its LoRA adapter, a process
started, waited for and always stopped, and an OpenAI client talking to it.

    with VllmEngine(cfg, base_dir, adapter_dir) as engine:
        generator = engine.generator()        # an OpenAIGenerator for the bundle, eval or serve

The adapter is served as LoRA module `ragtune` (`--enable-lora`), or, with a merged model
(`ragtune export`), the merged folder is the base and no adapter is named.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from ragtune.config import Config, UserError

MODEL_ID = "ragtune"


class VllmConfig(Config):
    """`vllm` (conf/vllm/default.yaml): the engine started by `serve.backend=vllm` and `eval.backend=vllm`."""

    executable: str = Field("vllm", description="the vllm command (found on PATH)")
    host: str = Field("127.0.0.1", description="address vLLM binds (loopback: only ragtune talks to it)")
    port: int = Field(8001, ge=1, le=65535, description="port vLLM listens on")
    startup_timeout: float = Field(600.0, gt=0, description="seconds to wait for /v1/models to answer")
    max_concurrency: int = Field(32, ge=1, description="requests ragtune keeps in flight to vLLM")
    request_timeout: float = Field(600.0, gt=0, description="seconds per request")
    extra_args: list[str] = Field([], description="more arguments for `vllm serve` (e.g. --gpu-memory-utilization 0.8)")


class EngineError(UserError, RuntimeError):
    """vLLM could not be started, or stopped answering: the message says which and how to fix it."""


def vllm_command(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike | None, *, host: str = "127.0.0.1",
                 port: int = 8001, executable: str = "vllm", extra_args: list[str] | None = None) -> list[str]:
    """`vllm serve` for a base model plus, when given, its adapter as LoRA module `ragtune`."""
    cmd = [executable, "serve", str(base_dir), "--host", host, "--port", str(port),
           "--served-model-name", f"{MODEL_ID}-base"]
    if adapter_dir is not None:
        rank = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("r", 16)
        cmd += ["--enable-lora", "--lora-modules", f"{MODEL_ID}={adapter_dir}", "--max-lora-rank", str(rank)]
    return cmd + list(extra_args or [])


def served_model_name(adapter_dir: str | os.PathLike | None) -> str:
    """The model name requests use: the LoRA module when there is an adapter, else the base."""
    return MODEL_ID if adapter_dir is not None else f"{MODEL_ID}-base"


class VllmEngine:
    """A `vllm serve` process for the lifetime of a `with` block (and never beyond the Python process)."""

    def __init__(self, cfg: VllmConfig, base_dir: str | os.PathLike, adapter_dir: str | os.PathLike | None = None,
                 log_path: str | os.PathLike | None = None):
        self.cfg, self.base_dir, self.adapter_dir = cfg, Path(base_dir), adapter_dir
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None
        self.url = f"http://{cfg.host}:{cfg.port}/v1"

    def command(self) -> list[str]:
        return vllm_command(self.base_dir, self.adapter_dir, host=self.cfg.host, port=self.cfg.port,
                            executable=self.cfg.executable, extra_args=self.cfg.extra_args)

    def start(self) -> VllmEngine:
        if not shutil.which(self.cfg.executable):
            raise EngineError(f"'{self.cfg.executable}' not found on PATH: install vLLM (GPU), "
                              "or use backend=transformers")
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115 (closed in stop)
        # its own process group, so stopping it also stops the workers vLLM forks
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._log = log
        atexit.register(self.stop)
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + self.cfg.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                where = f" (its output: {self.log_path})" if self.log_path else ""
                raise EngineError(f"vllm exited with code {self.proc.returncode} while starting{where}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/models", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise EngineError(f"vllm did not answer on {self.url} within {self.cfg.startup_timeout:g} s")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the process group, SIGKILL after `timeout`; safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if getattr(self, "_log", None) not in (None, subprocess.DEVNULL):
            self._log.close()
            self._log = None
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)

    def generator(self, system: str | None = None):
        """An OpenAIGenerator for this engine's model, with the configured concurrency."""
        from ragtune.inference import OpenAIGenerator

        return OpenAIGenerator(self.url, served_model_name(self.adapter_dir), timeout=self.cfg.request_timeout,
                               max_concurrency=self.cfg.max_concurrency, system=system)

    def __enter__(self) -> VllmEngine:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
