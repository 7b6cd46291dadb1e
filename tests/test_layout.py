"""The shape of engine/: every import of the package (module level, inside functions and under
TYPE_CHECKING alike) goes downward through the folders, there is no import cycle, and the config loads no
model code (docs/design.md, "Layout")."""
import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENGINE = ROOT / "engine"

# What each part of the engine may import of the engine besides itself (docs/design.md, "Layout").
ALLOWED = {
    "algorithms": set(),
    "config": {"algorithms"},
    "runtime": set(),
    "data": {"config"},
    "model": {"config"},
    "iteration": {"model", "data", "runtime", "algorithms", "config"},
    "evaluation": {"iteration", "model", "data", "runtime", "algorithms", "config"},
    "plan": {"config"},  # reads configs and the op's plan, loads no model
    # build, loop, train
    "top": {"evaluation", "iteration", "model", "data", "runtime", "algorithms", "config", "plan"},
}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _part(module: str) -> str:
    """The folder a module of the engine belongs to ('top' for engine/build.py, loop.py, train.py)."""
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and (ENGINE / parts[1]).is_dir()):
        return parts[1]
    return "top"


def _imports(path: pathlib.Path) -> set[str]:
    """The engine modules a file imports, resolved to module names (relative imports included)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in out if m == "engine" or m.startswith("engine.")}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ENGINE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        # an import of a name from a module counts as an import of the module (names that are not modules drop)
        graph[name] = {m for m in _imports(path) if m in files and m != name} - _packages_of(name)
    return graph


def _packages_of(module: str) -> set[str]:
    """A module's enclosing packages (importing it runs their __init__ first)."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_every_import_goes_downward():
    upward = []
    for module, targets in _graph().items():
        part = _part(module)
        for target in targets - {"engine"}:
            other = _part(target)
            if other != part and other not in ALLOWED[part]:
                upward.append(f"{module} ({part}) imports {target} ({other})")
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_walk_sees_relative_imports_and_imports_inside_functions():
    imports = _imports(ENGINE / "model" / "forward.py")
    assert {"engine.model.packing", "engine.model.block_attention"} <= imports
    assert "engine.algorithms.inputs" in _imports(ENGINE / "algorithms" / "rebel.py")  # inside `loss`


def test_the_config_loads_neither_transformers_nor_torch():
    code = ("import sys, engine.config as C; C.from_json(C.to_json(C.default())); C.help_text(); "
            "[p() for p in C.PRESETS.values()]; "
            "print(sorted(m for m in ('torch', 'torch.distributed', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
