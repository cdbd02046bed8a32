"""Typed, strict parameters.

`conf/` (Hydra) composes `params.yaml`; DVC tracks its keys per stage. Each config group has one
typed class beside the code it configures (`SftConfig` in `ragtune.training`, `ServeConfig` in
`ragtune.serve`, ...), and that class is the only place its defaults live: `make params` writes
`conf/<group>/default.yaml` from the class (values and one-line help) and then `params.yaml`.
Unknown keys are rejected and values range-checked, with the file, line and key path in the error:

    params = read_params("params.yaml")
    sft = params.group("sft", SftConfig)   # validated, frozen
    common = params.common()               # seed, lr, device, dtype

`compose()` rebuilds params.yaml from conf/ exactly as DVC's `hydra.enabled` does.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

PARAMS_FILE = "params.yaml"


class UserError(Exception):
    """A problem the user can fix (bad input, bad settings, a missing tool): reported as one clear line,
    without a traceback, and exit code 1."""


class ConfigError(UserError, ValueError):
    """A parameter file that does not validate: the message names the file, line and key path."""


class Config(BaseModel):
    """Base of every config group: unknown keys rejected, values checked on construction, frozen.
    Each field's `description` is its one-line help (written into conf/<group>/default.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class CommonConfig(Config):
    """The top-level keys: read by several stages (`lr` by sft alone, so `-S lr=1e-4` reruns only it)."""

    seed: int = Field(42, ge=0, description="seed of every sample, shuffle and initialisation")
    lr: float = Field(2.0e-4, gt=0, le=1, description="SFT learning rate (top level so that `-S lr=1e-4` works as typed)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="where models run: auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="model precision: auto = bf16 on CUDA or on a CPU with native bf16, else float32")
    profile_name: str = Field("default", description="which conf/profile sized the stages (set by the profile)")


# --------------------------------------------------------------------------- reading params files


def repo_root() -> Path:
    """The project root: DVC_ROOT under `dvc exp run`/`dvc repro`, else the folder holding dvc.yaml."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").exists():
            return folder
    return here


class Params:
    """A composed params file: raw values, plus the YAML node tree so errors can name the line."""

    def __init__(self, data: Mapping[str, Any], path: str | os.PathLike = PARAMS_FILE, nodes: Any = None):
        self.data, self.path, self._nodes = dict(data or {}), Path(path), nodes

    def group(self, key: str, schema: Any) -> Any:
        """The `key` block validated as `schema` (a Config class or a tagged union of them)."""
        if key not in self.data:
            raise ConfigError(f"{self.path}: no '{key}' block (run `make params`)")
        return validate(schema, self.data[key], self, (key,))

    def common(self) -> CommonConfig:
        return validate(CommonConfig, {k: self.data[k] for k in CommonConfig.model_fields if k in self.data}, self, ())

    def line_of(self, keys: tuple[Any, ...]) -> int | None:
        """1-based line of the deepest key of `keys` found in the file (None without a file)."""
        node, line = self._nodes, None
        for key in keys:
            if not isinstance(node, yaml.MappingNode):
                break
            match = next(((k, v) for k, v in node.value if k.value == str(key)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        return line


def read_params(path: str | os.PathLike = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (run `make params`, or pass --params)") from None
    try:
        data = yaml.safe_load(text) or {}
        nodes = yaml.compose(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of parameters, got {type(data).__name__}")
    return Params(data, path, nodes)


def validate(schema: Any, values: Any, params: Params | None = None, prefix: tuple[Any, ...] = ()) -> Any:
    """`schema` (a Config class, or a tagged union of them such as TeacherConfig) validated from
    `values`; a pydantic error becomes ConfigError lines `file:line: key.path: problem`."""
    tagged = not isinstance(schema, type)
    try:
        return TypeAdapter(schema).validate_python(values)
    except ValidationError as err:
        raise ConfigError(describe(err, params, prefix, tagged)) from None


def describe(err: ValidationError, params: Params | None, prefix: tuple[Any, ...], tagged: bool = False) -> str:
    lines = []
    for problem in err.errors()[:8]:
        loc = problem["loc"][1:] if tagged else problem["loc"]  # a union's first location is its tag
        keys = prefix + tuple(loc)
        where = ".".join(str(k) for k in keys) or "(top level)"
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        elif problem["type"] == "missing":
            message = "missing required key"
        else:
            message = f"{problem['msg']} (got {problem.get('input')!r})"
        place = str(params.path) if params else "config"
        line = params.line_of(keys) if params else None
        lines.append(f"{place}:{line}: {where}: {message}" if line else f"{place}: {where}: {message}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- composing conf/


def compose(overrides: list[str] | None = None, config_dir: str | os.PathLike = "conf") -> str:
    """Compose conf/ exactly as DVC's `hydra.enabled` does and return the YAML it would write."""
    import tempfile

    from dvc.utils.hydra import compose_and_dump

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.yaml"
        compose_and_dump(out, str(Path(config_dir).resolve()), None, "config", tmp, overrides or [])
        return out.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- stage entry points


def stage_parser(doc: str | None) -> argparse.ArgumentParser:
    """Every stage script's command line: `--help`, and `--params` for trying a recipe on another file."""
    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    parser.add_argument("--params", default=PARAMS_FILE, help="composed params file (default: params.yaml)")
    return parser


def run_stage(name: str, main: Callable[[], Any]) -> None:
    """Run a stage's main(); a UserError becomes `name: message` on stderr and exit code 1."""
    try:
        main()
    except UserError as err:
        print(f"{name}: {err}", file=sys.stderr)
        sys.exit(1)
