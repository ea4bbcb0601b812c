"""Which way imports run (the project's layering rule): the import graph of the project's own modules, read from their
source (lazy imports inside functions included), has no cycle, and each layer imports only the ones below it."""

import ast
import re
from pathlib import Path
from typing import Dict, List, Optional, Set

from helpers import REPO_ROOT

# Not the project's code: the tests themselves, environments (and any hidden folder), caches and outputs.
EXCLUDED_DIRS = {"tests", "venv", "outputs", "__pycache__", "build"}
# What each top-level part may import of the project besides itself (util/ is the ground floor).
ALLOWED = {
    "util": set(),
    "models": {"util"},
    "datasets": {"util"},
    "engine": {"util", "datasets"},
    "hubconf": {"models", "util"},
}
# main.py's flags are the one source of their defaults: util.config reads them, lazily, to complete a namespace
# that comes from elsewhere (a checkpoint's, a Hugging Face config's); `from main import get_args_parser` and
# nothing else of main.py (tests/test_config.py checks it).
FLAG_READERS = {("util.config", "main")}


def module_name(path: Path) -> str:
    """'models.detr' for models/detr.py, 'models' for models/__init__.py."""
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_files() -> Dict[str, Path]:
    """{module name: file} of every .py file of the project that exists now (tools/ may be mid-move)."""
    files = {}
    for path in sorted(REPO_ROOT.rglob("*.py")):
        folders = path.relative_to(REPO_ROOT).parts[:-1]
        if not EXCLUDED_DIRS.intersection(folders) and not any(f.startswith(".") for f in folders):
            files[module_name(path)] = path
    return files


def resolve(name: str, importer: Path, modules: Dict[str, Path]) -> Optional[str]:
    """The project module `name` refers to from `importer`: relative to the repository root, or to the
    importer's own folder (where Python looks first for a script, e.g. d2/train_net.py's `import detr`)."""
    prefixes = [""]
    folder = importer.parent.relative_to(REPO_ROOT)
    if folder.parts:
        prefixes.append(".".join(folder.parts) + ".")
    for prefix in prefixes:
        if prefix + name in modules:
            return prefix + name
    return None


def imports_of(name: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """The project modules that the file at `path` (module `name`) imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [resolve(alias.name, path, modules) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            # `from pkg import x` imports the module pkg.x when there is one, else a name defined in pkg.
            targets = [
                resolve(f"{base}.{alias.name}" if base else alias.name, path, modules) or resolve(base, path, modules)
                for alias in node.names
            ]
        else:
            continue
        found.update(t for t in targets if t is not None and t != name)
    return found


def import_graph() -> Dict[str, Set[str]]:
    modules = project_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One cycle of the graph as [a, b, ..., a], or [] if there is none (depth-first search)."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def is_script(path: Path) -> bool:
    """A file run as a program (main.py, run_with_submitit.py, the tools, d2/train_net.py)."""
    return re.search(r"^if __name__ == [\"']__main__[\"']:", path.read_text(), re.MULTILINE) is not None


def top(name: str) -> str:
    return name.split(".")[0]


def test_the_graph_sees_the_project():
    graph = import_graph()
    assert {"main", "engine", "hubconf", "models", "models.detr", "datasets", "util.misc"} <= set(graph)
    assert {"models.backbone", "models.transformer", "models.two_stage"} <= graph["models"]
    assert "util.misc" in graph["models.segmentation"]  # a `from util.misc import ...`


def test_no_import_cycle():
    # A flag reader imports main.py inside the function that reads the parser, never when it is imported itself.
    graph = {name: {t for t in targets if (name, t) not in FLAG_READERS} for name, targets in import_graph().items()}
    assert find_cycle(graph) == []


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_layers_import_only_the_ones_below():
    wrong = [
        f"{name} imports {target}"
        for name, targets in import_graph().items()
        if top(name) in ALLOWED
        for target in sorted(targets)
        if top(target) != top(name) and top(target) not in ALLOWED[top(name)] and (name, target) not in FLAG_READERS
    ]
    assert wrong == []


def test_no_script_is_imported_by_a_module():
    modules = project_files()
    scripts = {name for name, path in modules.items() if is_script(path)}
    assert "main" in scripts
    wrong = [
        f"{name} imports the script {target}"
        for name, targets in import_graph().items()
        if name not in scripts
        for target in sorted(targets & scripts)
        if (name, target) not in FLAG_READERS
    ]
    assert wrong == []
