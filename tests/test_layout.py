"""The package's layout (docs/layout.md): no import circle, lazy imports included; each folder
imports only the layers its rule allows; subpackage ``__init__`` files stay light, and the
proposal workers never load torch (issue 28).

Imports are read from the source with ``ast`` (every ``import`` statement, those inside
functions too), not from a running interpreter, so that a lazy import cannot hide a circle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "spp_detect"

# What each part of the package may import (docs/layout.md#rules), by layer: the folders from
# the bottom up, then the root modules above them. A re-export module imports its target only.
LIBRARY = {"base", "runtime", "ops", "data", "models", "train", "evaluation"}
LAYERS = {
    "base": {"base"},  # errors, structures, _version
    "runtime": {"base", "runtime"},
    "ops": {"base", "ops", "spp_detect.runtime.device"},
    "data": {"base", "runtime", "ops", "data"},
    "models": {"base", "runtime", "ops", "data", "models"},
    "train": {"base", "runtime", "ops", "data", "models", "train"},
    "evaluation": {"base", "runtime", "ops", "data", "models", "evaluation"},
    "config": {"base", "runtime"},
    "stages": LIBRARY | {"config", "stages", "spp_detect.api"},  # `detect` runs the API
    "api": LIBRARY | {"config", "stages"},
    "cli": LIBRARY | {"config", "stages", "cli"},
    "package": {"base", "spp_detect.api"},
    "testing": LIBRARY | {"config", "stages", "cli"},
}
# Inside functions only: the config checks names against the modules that own them (read before
# torch loads), and reads a COCO file's classes.
LAZY_ONLY = {"config": {"data", "models"}}
SHIMS = {
    "spp_detect.spp": {"spp_detect.ops.spp"},
    "spp_detect.backbones": {"spp_detect.models.backbones", "spp_detect.models.weights"},
    "spp_detect.caffe": {"spp_detect.models.caffe"},
}
ROOT_LAYERS = {
    "errors": "base", "structures": "base", "_version": "base", "config": "config",
    "api": "api", "cli": "cli", "__main__": "cli", "testing": "testing",
}  # fmt: skip
# Per-verb stages never import one another; the composite verbs run the others.
VERBS = {
    "propose", "extract", "finetune", "train_svm", "train_bbox", "test", "eval", "detect", "report",
}  # fmt: skip
COMPOSITE_VERBS = {"run", "demo"}


def module_names() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("spp_detect", *path.relative_to(PACKAGE).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = module_names()


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(package module imported, whether at module level) of every import that runs: those
    under ``if TYPE_CHECKING`` never do."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, lazy) for alias in node.names if alias.name in MODULES)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in MODULES:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.append((child if child in MODULES else node.module, lazy))
        inner = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(path.read_text()), lazy=False)
    return found


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    if len(parts) == 2:
        return ROOT_LAYERS.get(parts[1], "shim")
    return parts[1]


def test_no_import_circle_lazy_imports_included():
    state: dict[str, str] = {}  # "open" while on the path, "done" after
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for imported, _ in GRAPH[module]:
            if state.get(imported) == "open":
                circle = [*path[path.index(imported) :], imported]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if imported not in state:
                visit(imported)
        path.pop()
        state[module] = "done"

    for module in GRAPH:
        if module not in state:
            visit(module)


def test_every_folder_imports_only_what_its_rule_allows():
    broken = []
    for module, imports in GRAPH.items():
        layer = layer_of(module)
        for imported, lazy in imports:
            if layer == "shim":
                ok = imported in SHIMS[module]
            else:
                rule = LAYERS[layer] | (LAZY_ONLY.get(layer, set()) if lazy else set())
                ok = layer_of(imported) in rule or imported in rule
            if not ok:
                broken.append(f"{module} imports {imported}{' (lazily)' if lazy else ''}")
    assert not broken, "imports against docs/layout.md's rules:\n" + "\n".join(broken)


def test_per_verb_stages_do_not_import_one_another():
    found = []
    for module, imports in GRAPH.items():
        parts = module.split(".")
        if parts[:2] != ["spp_detect", "stages"] or len(parts) < 3 or parts[2] not in VERBS:
            continue
        for imported, _ in imports:
            target = imported.split(".")
            other_verb = len(target) > 2 and target[2] in VERBS | COMPOSITE_VERBS - {parts[2]}
            if target[:2] == ["spp_detect", "stages"] and other_verb:
                found.append(f"{module} imports {imported}")
    assert not found, found


def test_subpackage_inits_import_nothing():
    for module, path in MODULES.items():
        if path.name == "__init__.py" and module != "spp_detect":
            body = ast.parse(path.read_text()).body
            assert not any(isinstance(n, ast.Import | ast.ImportFrom) for n in body), module


# Loaded by every command before its config is checked (runtime/), or by the proposal workers
# (data/ and the box clip): torch only inside functions.
WITHOUT_TORCH_AT_IMPORT = ("spp_detect.runtime.", "spp_detect.data.", "spp_detect.ops.boxes")


def test_torch_is_loaded_at_import_only_where_the_rules_allow():
    for module, path in MODULES.items():
        if not module.startswith(WITHOUT_TORCH_AT_IMPORT) or module == "spp_detect.runtime.device":
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                names += [alias.name for alias in node.names]
                assert not any(n.split(".")[0] == "torch" for n in names), module


def test_proposal_workers_do_not_import_torch():
    """A worker process unpickles ``stages.propose.compute_proposals``: importing it, and the
    modules it runs, must not load torch (seconds and hundreds of MB per worker)."""
    code = (
        "import sys, spp_detect.stages.propose, spp_detect.data.proposals; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_no_test_file_imports_another():
    """Shared helpers live in spp_detect/testing.py and fixtures in tests/conftest.py."""
    tests = Path(__file__).resolve().parent
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.startswith(("test_", "conftest", "tests")) for n in names), path.name
