"""The package graph is one-way: pyproject.toml's import-linter contracts hold, every package is
in a layer, and no module imports the project's own code inside a function unless it says why."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
ROOT_PACKAGES = PYPROJECT["tool"]["importlinter"]["root_packages"]

# Function-level imports of the project's own modules that stay, with the reason. Anything else
# goes at the top of its module: the layers leave no cycle for a local import to hide.
LAZY_IMPORTS: dict[str, tuple[set[str], str]] = {
    "cxr/cli/demo.py": ({"cxr.demo"}, "torchvision and every stage's code; `cxr --help` needs none"),
    "cxr/cli/predict.py": ({"classifiers.predict"}, "torchvision; `cxr --help` needs none"),
    "cxr/cli/explain.py": ({"eval.localization"}, "torchvision and pytorch-grad-cam; `cxr --help` needs none"),
    "cxr/cli/evaluate.py": ({"eval.generative", "eval.harmonization"},
                            "torchvision and the classifier trainer; `cxr --help` needs none"),
    "cxr/cli/train_gan.py": ({"eval.gan_snapshots"}, "FID snapshots: torchvision and the classifier trainer; "
                             "`cxr --help` needs none"),
    "cxr/cli/train_classifier.py": ({"classifiers.trainer", "classifiers.metadata_study"},
                                    "torchvision; `cxr --help` needs none"),
    "benchmarks/bench_classifier.py": ({"cxr.data.cache", "cxr.data.preprocess", "cxr.engine.data",
                                        "classifiers.models", "cxr.engine.distributed", "cxr.engine.memory",
                                        "cxr.engine.speed"},
                                       "each phase's subprocess imports only its own pipeline (peak memory)"),
    "benchmarks/bench_loader.py": ({"cxr.data.cache", "cxr.data.dataset", "cxr.data.preprocess", "cxr.data.record"},
                                   "each phase's subprocess imports only its own pipeline (peak memory)"),
    "benchmarks/bench_phantom.py": ({"cxr.phantom.generate", "cxr.phantom", "cxr.phantom.render",
                                     "cxr.phantom.writers"},
                                    "each run's subprocess imports what it measures; the parent stays light"),
}


def lint_imports_executable() -> str:
    beside = Path(sys.executable).parent / "lint-imports"
    found = str(beside) if beside.exists() else shutil.which("lint-imports")
    assert found, "lint-imports is not installed (pip install -e '.[dev]')"
    return found


def test_import_linter_contracts_are_kept():
    proc = subprocess.run([lint_imports_executable(), "--no-cache", "--no-logo"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    contracts = PYPROJECT["tool"]["importlinter"]["contracts"]
    assert {c["type"] for c in contracts} == {"layers", "acyclic_siblings"}
    assert f"Contracts: {len(contracts)} kept, 0 broken." in out, out


def test_every_package_has_a_layer():
    layers = next(c for c in PYPROJECT["tool"]["importlinter"]["contracts"] if c["type"] == "layers")["layers"]
    placed = {name.strip() for layer in layers for name in layer.split("|")}
    # every root package, except cxr, which is split into its subpackages and modules
    wanted = {p for p in ROOT_PACKAGES if p != "cxr"}
    wanted |= {f"cxr.{p.stem if p.is_file() else p.name}" for p in (ROOT / "cxr").iterdir()
               if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert wanted - placed == set(), "packages without a layer in pyproject.toml's [tool.importlinter]"


def _function_level_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of each import of a project module inside a function of ``path``."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if in_function and isinstance(child, ast.Import):
                found.extend((child.lineno, a.name) for a in child.names)
            elif in_function and isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.lineno, child.module))
            visit(child, inside)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return [(line, m) for line, m in found if m.split(".")[0] in ROOT_PACKAGES]


def test_no_function_level_import_of_project_code_without_a_reason():
    unexplained = []
    for folder in (*ROOT_PACKAGES, "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            allowed = LAZY_IMPORTS.get(rel, (set(), ""))[0]
            unexplained += [f"{rel}:{line}: {m}" for line, m in _function_level_imports(path) if m not in allowed]
    assert not unexplained, ("imports of project modules inside functions (move them to the top of the "
                             "module, or add them to LAZY_IMPORTS with the reason):\n" + "\n".join(unexplained))


def test_every_allowed_lazy_import_is_still_there_and_commented():
    for rel, (modules, _reason) in LAZY_IMPORTS.items():
        path = ROOT / rel
        assert {m for _, m in _function_level_imports(path)} == modules, rel
        assert "# lazy: " in path.read_text(encoding="utf-8"), f"{rel}: say why with a '# lazy: ...' comment"
