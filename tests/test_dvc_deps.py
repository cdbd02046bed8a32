"""dvc.yaml cannot drift from the code: each stage's declared deps cover every ragtune module its script
imports, directly or through other ragtune modules (imports inside functions count: they run too),
and each stage's script is one of its deps."""

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))


def ragtune_imports(path: Path) -> set[str]:
    """Dotted ragtune module names imported anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "ragtune"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ragtune":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from ragtune import prompts`
    return {name for name in found if module_file(name) is not None}


def module_file(name: str) -> Path | None:
    path = ROOT / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate.relative_to(ROOT)
    return None


def closure(script: Path) -> set[str]:
    """Every ragtune source file the script needs, as repo-relative paths."""
    seen: set[Path] = set()
    todo = [module_file(name) for name in ragtune_imports(ROOT / script)]
    while todo:
        file = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        todo += [module_file(name) for name in ragtune_imports(ROOT / file)]
        parent = ROOT / file.parent / "__init__.py"
        if parent.is_file() and parent.stat().st_size:
            todo.append(parent.relative_to(ROOT))
    return {str(f) for f in seen}


STAGES = [name for name, stage in DVC["stages"].items() if str(stage["cmd"]).startswith("python stages/")]


@pytest.mark.parametrize("stage", STAGES)
def test_stage_deps_cover_the_modules_its_script_imports(stage):
    spec = DVC["stages"][stage]
    script = Path(spec["cmd"].split()[1])
    deps = {d if isinstance(d, str) else next(iter(d)) for d in spec.get("deps", [])}
    assert str(script) in deps
    missing = sorted(closure(script) - deps)
    assert not missing, f"dvc.yaml stage '{stage}' misses deps {missing}"
    stale = sorted(d for d in deps if d.startswith("ragtune/") and d not in closure(script))
    assert not stale, f"dvc.yaml stage '{stage}' lists modules its script never imports: {stale}"


def test_the_checker_sees_lazy_imports():
    assert "ragtune/retrieval.py" in closure(Path("stages/split.py"))  # imported inside a function of data.py
