"""The layering rule, checked on the source: imports point one way and never form a loop.

Layers, bottom to top: core (`sandbox` outside `sandbox.app`) <- `substrate` <- `sweeps`, with
`figures` beside them reading tables (it may import the core's table helpers but neither torch,
`substrate` nor `sweeps`), and the app (`sandbox.app`: the CLI, its commands, the benchmark
runner) on top, the only code that may import every layer. Every import counts, also one inside
a function body (a lazy import is still a dependency).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sandbox", "substrate", "sweeps", "figures")
MAY_IMPORT = {
    "core": {"core"},
    "substrate": {"core", "substrate"},
    "figures": {"core", "figures"},
    "sweeps": {"core", "substrate", "figures", "sweeps"},
    "app": {"core", "substrate", "figures", "sweeps", "app"},
}


def _layer(module: str) -> str:
    top = module.split(".")[0]
    if top == "sandbox":
        return "app" if module == "sandbox.app" or module.startswith("sandbox.app.") else "core"
    return top


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules `name` imports (``from pkg import mod`` resolves to ``pkg.mod`` when it exists)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t.split(".")[0] in PACKAGES:
                found.add(t)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_import_points_down_the_layers(graph):
    bad = [f"{a} ({_layer(a)}) imports {b} ({_layer(b)})" for a, deps in graph.items() for b in deps
           if _layer(b) not in MAY_IMPORT[_layer(a)]]
    assert bad == []


def test_figures_never_import_torch():
    offenders = []
    for path in sorted((ROOT / "figures").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "torch"]
    assert offenders == []


def _loops(graph: dict[str, set[str]]) -> list[str]:
    """Depth-first search for cycles among project modules (a module importing its own package's
    `__init__` is not a loop)."""
    state: dict[str, int] = {}            # 1 = on the stack, 2 = done
    loops = []

    def visit(node, stack):
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if dep not in graph or dep == node or node.startswith(dep + "."):
                continue
            if state.get(dep) == 1:
                loops.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return loops


def test_no_import_loops(graph):
    assert _loops(graph) == []


def test_the_checker_sees_a_violation():
    """The rule is not vacuous: a core module importing the app is caught."""
    assert "app" not in MAY_IMPORT[_layer("sandbox.analytic")]
    assert _layer("sandbox.app.commands.sweep") == "app" and _layer("sandbox.stats") == "core"
    fake = {"sandbox.stats": {"sandbox.app.cli"}, "sandbox.app.cli": set()}
    assert [a for a, deps in fake.items() for b in deps if _layer(b) not in MAY_IMPORT[_layer(a)]] == ["sandbox.stats"]
    loop = {"sweeps.grid": {"sweeps.boundary"}, "sweeps.boundary": {"sweeps.grid"}, "sweeps": set()}
    assert _loops(loop) == ["sweeps.boundary -> sweeps.grid -> sweeps.boundary"]


#: What the generic worker queue may import from the project: errors, result helpers, the ledger
#: and its storage, and its own database and trial-row modules. Every system (the maps, the factorial, the analytic
#: solver, the transformer substrate) comes in through the registry the app hands to `run_worker`.
QUEUE = ("sweeps.worker", "sweeps.queue_db", "sweeps.queue_trials")
#: sandbox.results is a package of one concern per module (atomic writes, JSON form, run folders, manifest).
QUEUE_MAY_IMPORT = {"sandbox", "sandbox.errors", "sandbox.results", "sandbox.results.atomic", "sandbox.results.folders",
                    "sandbox.results.jsonable", "sandbox.results.manifest", "sweeps", "sweeps.ledger", "sweeps.storage",
                    *QUEUE}


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_the_worker_queue_imports_no_system(graph):
    """`sweeps.worker` is the generic queue: neither it nor anything it imports (lazily included)
    reaches a system module (`sweeps.grid`, `sweeps.analytic_map`, `sweeps.substrate_map`, `sweeps.factorial`,
    `sweeps.systems`, `substrate.*`, `sandbox.analytic`, ...)."""
    assert set(QUEUE) <= set(graph)
    reached = _reach(graph, "sweeps.worker")
    assert sorted(reached - QUEUE_MAY_IMPORT) == []
    # not vacuous: the registry does reach the systems
    systems = _reach(graph, "sweeps.systems")
    assert {"sweeps.grid", "sweeps.analytic_map", "sweeps.substrate_map", "sweeps.factorial", "substrate.cell"} <= systems


COMMANDS = "sandbox.app.commands."


def _command_imports(graph: dict[str, set[str]]) -> list[str]:
    """Command modules importing another command module (the package `sandbox.app.commands` itself
    is not a command)."""
    return sorted(f"{a} imports {b}" for a, deps in graph.items() if a.startswith(COMMANDS)
                  for b in deps if b.startswith(COMMANDS) and b != a)


def test_no_command_imports_another(graph):
    """What two commands share lives in an app module that is not a command (`sandbox.app.plan`,
    `cellopts`, `maps`), so a command can be read, changed or removed on its own."""
    assert {COMMANDS + "sweep", COMMANDS + "full", COMMANDS + "factorial", COMMANDS + "worker"} <= set(graph)
    assert _command_imports(graph) == []


def test_the_command_rule_sees_a_violation(tmp_path):
    """Not vacuous: both import forms main had (factorial took full's cell options at the top, sweep
    imported the worker's define step inside its body) are caught; an app module is not a command."""
    known = set(_modules())
    src = tmp_path / "factorial.py"
    src.write_text("from sandbox.app.commands.full import cell_options\n\n\n"
                   "def f():\n    from sandbox.app.commands import worker as w\n    from sandbox.app import plan\n")
    fake = {COMMANDS + "factorial": _imports(COMMANDS + "factorial", src, known), COMMANDS + "full": set()}
    assert "sandbox.app.plan" in fake[COMMANDS + "factorial"]
    assert _command_imports(fake) == [f"{COMMANDS}factorial imports {COMMANDS}full",
                                      f"{COMMANDS}factorial imports {COMMANDS}worker"]
