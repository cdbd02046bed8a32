"""vLLM as a managed engine: the `vllm serve` command for a base model and its LoRA adapter, a process
started, waited for and always stopped, and an OpenAI client talking to it.

    with VllmEngine(cfg, base_dir, adapter_dir) as engine:
        generator = engine.generator()        # an OpenAIGenerator for the bundle, eval or serve

The adapter is served as LoRA module `ragtune` (`--enable-lora`), or, with a merged model
(`ragtune export`), the merged folder is the base and no adapter is named.

Lifecycle, and how each failure reads (EngineError: one line for the user):
- before anything starts: the executable missing from PATH, the model or adapter folder missing, the
  port already taken (a leftover server would otherwise answer the health check);
- start: `vllm serve` in a process group of its own, its output appended to a log file (a temporary
  one unless `log_path` is given); ready once GET /v1/models answers and lists the served model;
  the process exiting first (its exit code and the log's path) or `startup_timeout` passing (the
  process group is stopped) is an error;
- running: requests through the OpenAI client, at most `max_concurrency` in flight; a request that
  cannot reach the server says whether the process died (exit code, log) or is alive but not answering;
- stop (end of the `with` block, an error, or the interpreter's exit): SIGTERM to the whole process
  group (vLLM forks workers), SIGKILL after a grace period; safe to call twice.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from ragtune.config import Config, UserError
from ragtune.inference import OpenAIGenerator

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
                 port: int = 8001, executable: str = "vllm", extra_args: list[str] | None = None,
                 dtype: str | None = None) -> list[str]:
    """`vllm serve` for a base model plus, when given, its adapter as LoRA module `ragtune`; `dtype` (the
    resolved top-level dtype) becomes `--dtype`, so vLLM computes in the precision every other backend uses."""
    cmd = [executable, "serve", str(base_dir), "--host", host, "--port", str(port),
           "--served-model-name", f"{MODEL_ID}-base"]
    if dtype is not None:
        cmd += ["--dtype", dtype]
    if adapter_dir is not None:
        rank = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("r", 16)
        cmd += ["--enable-lora", "--lora-modules", f"{MODEL_ID}={adapter_dir}", "--max-lora-rank", str(rank)]
    return cmd + list(extra_args or [])


def served_model_name(adapter_dir: str | os.PathLike | None) -> str:
    """The model name requests use: the LoRA module when there is an adapter, else the base."""
    return MODEL_ID if adapter_dir is not None else f"{MODEL_ID}-base"


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on host:port."""
    with contextlib.closing(socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _last_line(path: Path | None) -> str:
    if path is None:
        return ""
    with contextlib.suppress(OSError):
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            return f"; last line: {lines[-1][:300]}"
    return ""


class VllmEngine:
    """A `vllm serve` process for the lifetime of a `with` block (and never beyond the Python process)."""

    def __init__(self, cfg: VllmConfig, base_dir: str | os.PathLike, adapter_dir: str | os.PathLike | None = None,
                 log_path: str | os.PathLike | None = None, dtype: str | None = None):
        self.cfg, self.base_dir, self.dtype = cfg, Path(base_dir), dtype
        self.adapter_dir = Path(adapter_dir) if adapter_dir is not None else None
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None
        self.pgid: int | None = None
        self.returncode: int | None = None
        self._log: Any = None
        self.url = f"http://{cfg.host}:{cfg.port}/v1"

    def command(self) -> list[str]:
        return vllm_command(self.base_dir, self.adapter_dir, host=self.cfg.host, port=self.cfg.port,
                            executable=self.cfg.executable, extra_args=self.cfg.extra_args, dtype=self.dtype)

    def check(self) -> None:
        """What would make the start fail, found before anything starts."""
        if not shutil.which(self.cfg.executable):
            raise EngineError(f"'{self.cfg.executable}' not found on PATH: install vLLM (`pip install vllm`, on a "
                              "GPU machine) or set vllm.executable, or use backend=transformers")
        if not (self.base_dir / "config.json").is_file():
            raise EngineError(f"{self.base_dir}: no config.json, nothing for vllm to serve")
        if self.adapter_dir is not None and not (self.adapter_dir / "adapter_config.json").is_file():
            raise EngineError(f"{self.adapter_dir}: no adapter_config.json (not a LoRA adapter)")
        if port_in_use(self.cfg.host, self.cfg.port):
            raise EngineError(f"port {self.cfg.port} on {self.cfg.host} is already in use (another vllm still "
                              "running?): stop it or set vllm.port")

    def start(self) -> VllmEngine:
        self.check()
        command = self.command()  # reads the adapter's rank: fails here, before a process exists
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="ragtune-vllm-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self._log.write(f"ragtune: {' '.join(command)}\n".encode())
        self._log.flush()
        # its own process group, so stopping it also stops the workers vLLM forks
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self.pgid, self.returncode = self.proc.pid, None
        atexit.register(self.stop)
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def exited(self, doing: str) -> EngineError:
        return EngineError(f"vllm exited with code {self.returncode} {doing} (its output: {self.log_path}"
                           f"{_last_line(self.log_path)})")

    def _wait_until_ready(self) -> None:
        import httpx

        name = served_model_name(self.adapter_dir)
        deadline = time.monotonic() + self.cfg.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.returncode = self.proc.returncode
                raise self.exited("while starting")
            with contextlib.suppress(httpx.HTTPError, ValueError):
                resp = httpx.get(f"{self.url}/models", timeout=2)
                if resp.status_code == 200 and name in {m.get("id") for m in resp.json().get("data", [])}:
                    return
            time.sleep(0.25)
        raise EngineError(f"vllm did not answer on {self.url} within {self.cfg.startup_timeout:g} s; stopped it "
                          f"(its output: {self.log_path}{_last_line(self.log_path)})")

    def alive(self) -> bool:
        if self.proc is None:
            return False
        if self.proc.poll() is not None:
            self.returncode = self.proc.returncode
            return False
        return True

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the process group, SIGKILL to whatever is left after `timeout`; safe to call twice.
        The group is signalled even when its leader already exited: vLLM's workers may outlive it."""
        proc, self.proc = self.proc, None
        pgid, self.pgid = self.pgid, None
        if pgid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if proc is not None:  # reap the leader: a zombie still counts as a member of the group
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=0.1)
                if not _group_alive(pgid):
                    break
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            if proc is not None:
                proc.wait()
                self.returncode = proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)

    def generator(self, system: str | None = None):
        """An OpenAIGenerator for this engine's model, with the configured concurrency; a request that
        cannot reach the server raises EngineError saying whether the process died."""
        return EngineGenerator(self, system)

    def __enter__(self) -> VllmEngine:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class EngineGenerator(OpenAIGenerator):
    """OpenAIGenerator bound to a managed engine: a request that cannot reach it raises EngineError
    saying whether the process died (its exit code and log) or is alive but not answering."""

    def __init__(self, engine: VllmEngine, system: str | None = None):
        super().__init__(engine.url, served_model_name(engine.adapter_dir), timeout=engine.cfg.request_timeout,
                         max_concurrency=engine.cfg.max_concurrency, system=system)
        self.engine = engine

    def _failure(self, err: Exception) -> EngineError:
        if not self.engine.alive():
            return self.engine.exited("while answering")
        return EngineError(f"vllm at {self.engine.url} is running but did not answer: {type(err).__name__}: {err}")

    def _one(self, *args: Any, **kwargs: Any):
        import openai

        try:
            return super()._one(*args, **kwargs)
        except (openai.APIConnectionError, openai.InternalServerError) as err:  # a timeout is a connection error
            raise self._failure(err) from err

    def stream(self, *args: Any, **kwargs: Any):
        import openai

        try:
            yield from super().stream(*args, **kwargs)
        except (openai.APIConnectionError, openai.InternalServerError) as err:
            raise self._failure(err) from err
