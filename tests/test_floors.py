"""The project's floors: every import points down (or sideways within a floor), never up, and never in a circle.

The imports are read from the source (``ast``), not by running it, so that
a lazy import inside a function counts as much as one at the top of a file.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Lowest first. A module may import from its own floor and the floors below it.
FLOORS = ["models", "core", "data", "features", "run", "evaluation", "verifier", "faces"]
# The seed project's names in module/, kept for users' imports: each re-exports one module and nothing imports it.
SEED_SHIMS = {"module.loss": "models.loss", "module.preprocess": "module.data.preprocess",
              "module.scheduler": "module.run.schedule"}
FACES = {"training_utils", "sig_dataloader_colab", "prepare_datasets", "synthetic_signatures", "downloads", "finetune"}


def floor_of(module: str) -> str:
    if module == "model_v3" or module.split(".")[0] == "models":
        return "models"
    if module in FACES or module in SEED_SHIMS or module == "module":  # module/__init__.py is empty
        return "faces"
    if module == "module.verifier":
        return "verifier"
    parts = module.split(".")
    assert parts[0] == "module" and parts[1] in FLOORS, f"{module} is on no floor: put it in a floor's package"
    return parts[1]


def project_modules() -> dict[str, Path]:
    files = [*ROOT.glob("*.py"), *ROOT.glob("models/**/*.py"), *ROOT.glob("module/**/*.py")]
    modules = {}
    for path in files:
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def imports_of(path: Path, known: set[str]) -> list[tuple[str, list[str], int]]:
    """``(project module imported, names imported from it, line)`` for every import of a project module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in known:
                found.append((node.module, [alias.name for alias in node.names], node.lineno))
            else:  # ``from module.data import pair_files``: submodules imported by name
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in known:
                        found.append((f"{node.module}.{alias.name}", [], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name in known]
    return found


def defined_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Try):  # ``try: import fcntl``
            names.update(alias.asname or alias.name for child in node.body if isinstance(child, ast.Import)
                         for alias in child.names)
    return names


def test_every_import_points_down_and_names_come_from_where_they_are_defined() -> None:
    modules = project_modules()
    known = set(modules)
    wrong = []
    for importer, path in sorted(modules.items()):
        for imported, names, line in imports_of(path, known):
            where = f"{path.relative_to(ROOT)}:{line} imports {imported}"
            if imported in SEED_SHIMS and importer not in FACES:
                wrong.append(f"{where}: a seed name kept for users; import {SEED_SHIMS[imported]}")
            if imported in FACES and importer not in FACES:
                wrong.append(f"{where}: a top-level face; the floors below import nothing of it")
            if FLOORS.index(floor_of(imported)) > FLOORS.index(floor_of(importer)):
                wrong.append(f"{where}: floor {floor_of(importer)} imports floor {floor_of(imported)}, above it")
            if importer not in FACES and importer not in SEED_SHIMS and names:
                missing = [name for name in names if name not in defined_names(modules[imported])
                           and f"{imported}.{name}" not in known]
                if missing:
                    wrong.append(f"{where}: {missing} are not defined there (import them from where they are)")
    assert not wrong, "\n".join(wrong)


def test_the_import_graph_has_no_circle() -> None:
    modules = project_modules()
    known = set(modules)
    graph = {name: {imported for imported, _, _ in imports_of(path, known) if imported != name}
             for name, path in modules.items()}
    # A package's __init__ importing its own modules is not a circle through them.
    graph = {name: {other for other in targets if not other.startswith(name + ".")} for name, targets in graph.items()}
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError("circular imports: " + " -> ".join([*trail, node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_the_model_floor_imports_nothing_of_module() -> None:
    modules = project_modules()
    for name, path in modules.items():
        if floor_of(name) == "models":
            assert not [imported for imported, _, _ in imports_of(path, set(modules)) if imported.startswith("module")], name


def test_importing_training_utils_loads_neither_the_dataset_tools_nor_scipy() -> None:
    check = ("import sys, training_utils; "
             "print(sorted(m for m in ('scipy', 'prepare_datasets', 'synthetic_signatures') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
