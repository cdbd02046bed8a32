"""The whole parameter set: which typed class validates each config group, the generated
`conf/<group>/default.yaml` files, and `python -m ragtune.params` (`make params`).

Two kinds of group:
- settings groups (split, retrieval, sft, ...): the class holds every default; `make params` writes
  `conf/<group>/default.yaml` from it, values with their one-line help, so the YAML never drifts;
- choice groups (data, model, embedder, teacher, router): each option file under `conf/<group>/` is a
  complete spec (the class has no defaults to fall back on), validated by the tests.
Profiles (`conf/profile/*.yaml`) only resize what the groups define.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from ragtune.bundle import PackageConfig
from ragtune.config import CommonConfig, Config, ConfigError, Params, compose, read_params
from ragtune.data import SplitConfig
from ragtune.sources import DataChoice
from ragtune.embedding import EmbedFtConfig
from ragtune.engine import VllmConfig
from ragtune.evaluate import EvalConfig
from ragtune.models import EmbedderConfig, ModelConfig
from ragtune.retrieval import RetrievalConfig
from ragtune.router import RouterConfig
from ragtune.serve import ServeConfig
from ragtune.teacher import DistillConfig, TeacherConfig
from ragtune.training import SftConfig

SETTINGS_GROUPS: dict[str, type[Config]] = {
    "split": SplitConfig,
    "retrieval": RetrievalConfig,
    "distill": DistillConfig,
    "sft": SftConfig,
    "embed_ft": EmbedFtConfig,
    "eval": EvalConfig,
    "package": PackageConfig,
    "serve": ServeConfig,
    "vllm": VllmConfig,
}
CHOICE_GROUPS: dict[str, Any] = {
    "data": DataChoice,
    "model": ModelConfig,
    "embedder": EmbedderConfig,
    "teacher": TeacherConfig,
    "router": RouterConfig,
}
GROUPS = SETTINGS_GROUPS | CHOICE_GROUPS
GLOBAL_GROUP = "common"  # conf/common/default.yaml: the top-level keys (CommonConfig), `# @package _global_`


def validate_all(params: Params) -> dict[str, Any]:
    """Every group of a composed params file validated, and no key outside them; returns the objects."""
    unknown = sorted(set(params.data) - set(GROUPS) - set(CommonConfig.model_fields))
    if unknown:
        raise ConfigError("\n".join(f"{params.path}:{params.line_of((k,))}: {k}: unknown key" for k in unknown))
    return {"common": params.common()} | {key: params.group(key, schema) for key, schema in GROUPS.items()}


# --------------------------------------------------------------------------- generated defaults


def _scalar(value: Any) -> str:
    """A YAML flow rendering of a value (floats keep their dot, so PyYAML reads them back as floats)."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000)
    return text.removesuffix("\n...\n").strip()


def _lines(model: type[BaseModel], values: BaseModel, indent: str = "") -> list[tuple[str, str]]:
    """(yaml text, help) rows for every field of `values`, nested configs as indented blocks."""
    rows = []
    for name, info in model.model_fields.items():
        value = getattr(values, name)
        if isinstance(value, BaseModel):
            rows.append((f"{indent}{name}:", info.description or ""))
            rows += _lines(type(value), value, indent + "  ")
        else:
            dumped = value.model_dump() if isinstance(value, BaseModel) else _plain(value)
            rows.append((f"{indent}{name}: {_scalar(dumped)}", info.description or ""))
    return rows


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def default_yaml(cls: type[Config], global_package: bool = False) -> str:
    """conf/<group>/default.yaml for a settings class: every default, each with its help as a comment."""
    doc = (cls.__doc__ or "").strip().split("\n\n")[0].splitlines()
    head = ["# @package _global_"] if global_package else []
    head += [f"# {line.strip()}" for line in doc]
    head += [f"# Generated from {cls.__module__}.{cls.__name__} by `make params`: edit the class, not this file."]
    rows = _lines(cls, cls())
    width = max(len(text) for text, _ in rows) + 2
    body = [f"{text.ljust(width)}# {help_}" if help_ else text for text, help_ in rows]
    return "\n".join(head + body) + "\n"


def expected_defaults() -> dict[str, str]:
    """Relative path under conf/ -> the text `make params` writes there."""
    files = {f"{key}/default.yaml": default_yaml(cls) for key, cls in SETTINGS_GROUPS.items()}
    files[f"{GLOBAL_GROUP}/default.yaml"] = default_yaml(CommonConfig, global_package=True)
    return files


def settings_reference() -> str:
    """docs/settings.md: every group's keys with their default and one-line help, from the classes."""
    lines = ["# Settings reference", "",
             "Generated from the typed config classes by `make params`; the classes are the only place defaults",
             "live. Override any key with `dvc exp run -S group.key=value`; unknown keys and values out of range",
             "are errors naming the file, line and key path.", ""]
    groups = {"(top level)": CommonConfig} | SETTINGS_GROUPS | CHOICE_GROUPS
    for name, schema in groups.items():
        classes = list(getattr(schema, "__args__", [schema])[0].__args__) if hasattr(schema, "__metadata__") else [schema]
        for cls in classes:
            doc = " ".join((cls.__doc__ or "").split())
            lines += [f"## `{name}` — {cls.__module__}.{cls.__name__}", "", doc, "", "| key | default | help |", "|---|---|---|"]
            lines += [f"| `{key}` | {default} | {help_} |" for key, default, help_ in _reference_rows(cls)]
            lines.append("")
    return "\n".join(lines)


def _reference_rows(cls: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    from pydantic_core import PydanticUndefined

    rows = []
    for name, info in cls.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += _reference_rows(annotation, f"{prefix}{name}.")
            continue
        default = "required" if info.default is PydanticUndefined else f"`{_scalar(_plain(info.default))}`"
        rows.append((f"{prefix}{name}", default.replace("|", "\\|"), (info.description or "").replace("|", "\\|")))
    return rows


def write_defaults(conf_dir: str | os.PathLike = "conf") -> list[Path]:
    written = []
    for rel, text in expected_defaults().items():
        path = Path(conf_dir) / rel
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written


def main() -> None:
    """`make params`: conf/<group>/default.yaml from the classes, then params.yaml from conf/, validated."""
    for path in write_defaults("conf"):
        print(f"wrote {path}")
    reference = Path("docs/settings.md")
    reference.parent.mkdir(exist_ok=True)
    if not reference.exists() or reference.read_text(encoding="utf-8") != settings_reference():
        reference.write_text(settings_reference(), encoding="utf-8")
        print(f"wrote {reference}")
    Path("params.yaml").write_text(compose(), encoding="utf-8")
    try:
        validate_all(read_params("params.yaml"))
    except ConfigError as err:
        sys.exit(f"params.yaml does not validate:\n{err}")
    print("params.yaml composed from conf/ and validated")


if __name__ == "__main__":
    main()
