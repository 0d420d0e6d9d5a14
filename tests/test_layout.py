"""The house's import structure, read from the source (ast; nothing is imported): packages import only the floors
below them, no modules import each other in a circle, scripts are not libraries, test modules stand alone."""
import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

ROOT = Path(__file__).resolve().parent.parent
# The floors, from the ground up: a package imports only packages on lower floors (none on its own).
FLOORS = (
    ("cc_attention", "libs", "utils"),  # the op (nothing of ours: it could be a library of its own), norms, helpers
    ("dataset", "networks"),
    ("engine",),
    ("benchmarks",),
)
PACKAGES = {package for floor in FLOORS for package in floor}
SCRIPTS = {path.stem for path in ROOT.glob("*.py")}  # train.py, evaluate.py, ...: the top floor, imported by no one


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> Dict[str, Path]:
    """The scripts and every module of the packages, by module name."""
    paths = list(ROOT.glob("*.py"))
    for package in sorted(PACKAGES):
        paths += (ROOT / package).rglob("*.py")
    return {module_name(path): path for path in paths}


def imports_of(path: Path, package: Optional[str], known: Set[str]) -> Set[str]:
    """The modules of ``known`` that ``path`` imports (anywhere in the file, relative imports resolved);
    ``from pkg import name`` counts as ``pkg.name`` when that is a module, else as ``pkg``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # import a.b.c of the module a.b (c a name in it)
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph(files: Dict[str, Path]) -> Dict[str, Set[str]]:
    known = set(files)
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = imports_of(path, package, known) - {name}
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One circle of the graph as a path ``[a, b, ..., a]``, or None."""
    state: Dict[str, str] = {}
    stack: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_every_package_has_a_floor():
    packages = {path.parent.name for path in ROOT.glob("*/__init__.py")}
    assert packages == PACKAGES, "place each package on a floor of FLOORS (and only the packages there are)"


def test_packages_import_only_lower_floors():
    floor_of = {package: index for index, floor in enumerate(FLOORS) for package in floor}
    graph = import_graph(source_files())
    assert "cc_attention" in graph["networks.heads"]  # the reader sees the imports: a blind one would pass anything
    wrong = []
    for module, targets in graph.items():
        package = module.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if package in PACKAGES and other != package and not floor_of[other] < floor_of[package]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports of a package on the same or a higher floor: " + ", ".join(sorted(wrong))


def test_no_packages_or_modules_import_each_other_in_a_circle():
    graph = import_graph(source_files())
    packages: Dict[str, Set[str]] = {}
    for module, targets in graph.items():
        package = module.split(".")[0]
        packages.setdefault(package, set()).update(target.split(".")[0] for target in targets)
        packages[package].discard(package)
    cycle = find_cycle(packages)
    assert cycle is None, "package circle: " + " -> ".join(cycle)
    cycle = find_cycle(graph)
    assert cycle is None, "module circle: " + " -> ".join(cycle)
    # one import back from utils.cli to train.py, which imports it, would be found
    assert find_cycle({**graph, "utils.cli": graph["utils.cli"] | {"train"}}) is not None


def test_scripts_are_not_libraries():
    importers = [f"{module} -> {target}" for module, targets in import_graph(source_files()).items()
                 for target in targets if target in SCRIPTS]
    assert not importers, "modules importing a script (move what they share into a package): " + ", ".join(importers)


def test_test_modules_do_not_import_each_other():
    tests = {path.stem: path for path in (ROOT / "tests").glob("*.py")}
    importers = [f"{name} -> {target}" for name, path in tests.items()
                 for target in imports_of(path, None, set(tests))]
    assert not importers, "test modules importing another (share through conftest.py fixtures): " + ", ".join(importers)
