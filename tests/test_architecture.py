"""The direction of imports (docs/ARCHITECTURE.md), read from the source with `ast`:
tools -> (pipelines, stcn) -> shards, and inside stcn: model <- inference, model <- train,
evaluation on top."""

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> the packages of ours it may import (itself always allowed)
ALLOWED = {
    "shards": set(),
    "pipelines": {"shards"},
    "stcn.model": {"shards"},
    "stcn.inference": {"stcn.model", "shards"},
    "stcn.train": {"stcn.model", "shards"},
    "stcn.evaluation": {"stcn.model", "stcn.inference", "stcn.train", "shards"},
}
OURS = ("shards", "pipelines", "stcn", "tools")


def _package_of(module: str) -> str | None:
    """The ALLOWED key a dotted module name belongs to (longest match)."""
    for key in sorted(ALLOWED, key=len, reverse=True):
        if module == key or module.startswith(key + "."):
            return key
    return None


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every absolute module a file imports, lazy imports inside functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "stcn":   # from stcn import model  ->  stcn.model
                found += [(node.lineno, f"stcn.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def _violations() -> list[str]:
    bad = []
    for key, allowed in ALLOWED.items():
        folder = ROOT / key.replace(".", "/")
        assert folder.is_dir(), f"{folder} is missing: update ALLOWED with the layout"
        for path in sorted(folder.rglob("*.py")):
            for line, module in _imports(path):
                if module.split(".")[0] not in OURS:
                    continue
                target = _package_of(module)
                if target == key or target in allowed:
                    continue
                if target is None and module.split(".")[0] == "stcn" and key.startswith("stcn"):
                    target = module   # e.g. a module left at the top of stcn/
                if target is None or target not in allowed:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {module} "
                               f"({key} may import only {sorted(allowed) or 'nothing of ours'})")
    return bad


def test_imports_point_one_way():
    assert _violations() == []


def test_stcn_has_only_the_four_layers():
    top = sorted(p.name for p in (ROOT / "stcn").glob("*.py"))
    layers = sorted(p.name for p in (ROOT / "stcn").iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert top == ["__init__.py"]
    assert layers == ["evaluation", "inference", "model", "train"]


def test_the_checker_sees_a_wrong_way_import(tmp_path, monkeypatch):
    """The check can fail: a model module importing the trainer is reported."""
    fake = tmp_path / "stcn" / "model"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from stcn.train import trainer\n")
    for key in ALLOWED:
        if key != "stcn.model":
            (tmp_path / key.replace(".", "/")).mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert _violations() == ["stcn/model/bad.py:2 imports stcn.train "
                             "(stcn.model may import only ['shards'])"]


@pytest.mark.parametrize("module", ["stcn.model.network", "stcn.inference.core", "stcn.train.trainer",
                                    "stcn.evaluation.gpu_bench"])
def test_each_layer_imports(module):
    __import__(module)



ECHO_CHILD = """
import json, sys
request = json.loads(sys.argv[1])
for line in sys.stdin:
    if line.strip() == "die":
        sys.exit(3)
    print(json.dumps({"got": line.strip(), "request": request}), flush=True)
"""


def test_a_child_module_answers_line_by_line_and_its_failure_is_named(tmp_path, monkeypatch):
    """shards.child: how the benchmarks run the published code in a process of its own."""
    from shards.child import REPO, LineChild, module_env

    (tmp_path / "echo_child.py").write_text(ECHO_CHILD)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert module_env()["PYTHONPATH"].split(os.pathsep) == [str(REPO), str(tmp_path)]
    child = LineChild("echo_child", {"n": 1}, "the echo child")
    try:
        assert child.ask("a") == {"got": "a", "request": {"n": 1}}
        assert child.ask("b")["got"] == "b"
        with pytest.raises(RuntimeError, match=r"the echo child's process failed \(exit 3"):
            child.ask("die")
    finally:
        child.close(timeout=10)
