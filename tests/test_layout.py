"""The package layout itself: every package sits in the layering contract, and no module imports one
of ours inside a function (the way an import cycle hides)."""

import ast
from pathlib import Path

import tomllib

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "glm130b"
PYPROJECT = PACKAGE.parents[1] / "pyproject.toml"


def layered_packages() -> set[str]:
    contracts = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
    [layers] = [c["layers"] for c in contracts if c["type"] == "layers"]
    return {name.strip() for layer in layers for name in layer.split("|")}


def test_every_package_and_top_level_module_is_in_the_layering_contract():
    ours = {f"glm130b.{p.name}" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    ours |= {f"glm130b.{p.stem}" for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    assert ours == layered_packages(), "add the new package to [tool.importlinter] in pyproject.toml"


def function_level_imports(source: str) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("glm130b"):
                    found.append((inner.lineno, inner.module))
                elif isinstance(inner, ast.Import):
                    found += [(inner.lineno, a.name) for a in inner.names if a.name.startswith("glm130b")]
    return found


def test_the_checker_sees_an_import_inside_a_function():
    assert function_level_imports("def f():\n    from glm130b.model import GLM\n") == [(2, "glm130b.model")]
    assert function_level_imports("from glm130b.model import GLM\n") == []


def test_no_module_imports_our_own_modules_inside_a_function():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        offenders += [
            f"{relative}:{line} imports {module}" for line, module in function_level_imports(path.read_text())
        ]
    assert offenders == []
