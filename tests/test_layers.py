"""The import direction of the layers (DESIGN.md): imports go down, never up or sideways."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What each package may import from the project (besides itself).
ALLOWED = {
    "retrieval": set(),
    "mining": {"retrieval"},
    "evaluation": {"retrieval"},
    "serving": {"retrieval"},
    "trainers": {"retrieval", "mining", "evaluation"},
    "cluster": {"retrieval", "mining", "evaluation", "serving", "trainers"},
}


def project_imports(path: Path) -> set[str]:
    """The `raytrieval.<package>` names a module imports (at any depth: lazy imports count)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
        for module in modules:
            parts = module.split(".")
            if parts[0] == "raytrieval" and len(parts) > 1:
                names.add(parts[1])
            elif parts[0] in ALLOWED:
                names.add("bare:" + parts[0])
    return names


def test_imports_go_down_the_layers():
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in project_imports(path) - allowed - {package}:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_tests_and_benchmarks_use_the_installed_names():
    """`from retrieval import ...` would load a second copy of a module beside `raytrieval.retrieval`."""
    bare = [f"{p.relative_to(ROOT)}: {n}" for folder in ("tests", "benchmarks") for p in sorted((ROOT / folder).rglob("*.py"))
            for n in project_imports(p) if n.startswith("bare:")]
    assert not bare, "\n".join(bare)


def test_the_checker_sees_a_wrong_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from raytrieval.cluster.runtime import init_ray\nimport serving.app\n")
    assert project_imports(module) == {"cluster", "bare:serving"}
