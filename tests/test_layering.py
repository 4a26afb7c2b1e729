"""The seam, checked statically: no module cycle, methods never import the runtime, nothing imports a
method by string, and architecture/method names are only branched on where they belong."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lorabench"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


MODULES = _modules()


def _imports(name: str, tree: ast.Module) -> set[str]:
    """lorabench modules ``name`` imports anywhere (module level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, tree) for name, tree in MODULES.items()}


def _cycle() -> list[str] | None:
    """A module-level import cycle through lorabench modules other than package ``__init__`` re-exports."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(GRAPH[node]):
            if node.startswith(dep + "."):  # a module importing its own package (always loaded first)
                continue
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(GRAPH):
        if name not in state and (found := visit(name)):
            return found
    return None


def test_no_import_cycle() -> None:
    assert _cycle() is None, " -> ".join(_cycle() or [])


def test_methods_import_nothing_from_runtime() -> None:
    bad = {name: sorted(d for d in deps if d.startswith("lorabench.runtime"))
           for name, deps in GRAPH.items() if name.startswith("lorabench.methods")}
    assert not {k: v for k, v in bad.items() if v}


def test_no_method_module_imported_by_string() -> None:
    for name, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
                text = ast.unparse(node.args[0]) if node.args else ""
                assert "methods" not in text, f"{name} imports a method module by string: {text}"


def _compares(tree: ast.Module) -> list[ast.Compare]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Compare)]


def test_model_type_compared_only_in_architectures() -> None:
    bad = []
    for name, tree in MODULES.items():
        if name == "lorabench.architectures":
            continue
        for node in _compares(tree):
            if any(isinstance(a, ast.Attribute) and a.attr == "model_type" for a in ast.walk(node)):
                bad.append(f"{name}:{node.lineno} {ast.unparse(node)}")
    assert not bad, "branch on an architecture trait (ModelSpec.traits) instead: " + "; ".join(bad)


def test_method_names_branched_on_only_in_their_folder() -> None:
    from lorabench.methods import METHOD_NAMES

    bad = []
    for name, tree in MODULES.items():
        for node in _compares(tree):
            strings = {c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
            for method in strings & set(METHOD_NAMES):
                if not name.startswith(f"lorabench.methods.{method}"):
                    bad.append(f"{name}:{node.lineno} {ast.unparse(node)}")
    assert not bad, "use a hook of the method's registry entry instead: " + "; ".join(bad)


def test_every_method_satisfies_the_typed_seam() -> None:
    """Each registered estimator and step-time module has every hook of its protocol (no getattr fallbacks)."""
    import inspect

    from lorabench.methods.protocols import Estimator, StepTimeTerms
    from lorabench.methods.registry import registered

    hooks = [n for n, v in vars(Estimator).items() if inspect.isfunction(v)]
    assert {"root_trainable_params", "trainable_tensor_numels", "largest_trainable_params"} <= set(hooks)
    for name, method in registered().items():
        assert isinstance(method.estimator, Estimator), name
        assert all(callable(getattr(method.estimator, h)) for h in hooks), name
        assert method.step_time is not None and isinstance(method.step_time, StepTimeTerms), name


def test_planner_reads_no_hook_by_getattr() -> None:
    bad = [f"{n}:{c.lineno}" for n, tree in MODULES.items() if n.startswith("lorabench.memory")
           for c in ast.walk(tree) if isinstance(c, ast.Call) and getattr(c.func, "id", "") == "getattr"
           and any(isinstance(a, ast.Name) and a.id == "hooks" for a in c.args)]
    assert not bad, "declare the hook on the Estimator protocol instead: " + "; ".join(bad)


def test_method_names_not_looked_up_outside_their_folder() -> None:
    """``evals["qlora"]``-style lookups and tables of method names belong on the method (PAIRINGS, hooks)."""
    from lorabench.methods import CONFIGS

    labels = {label for cls in CONFIGS.values() for label in cls.all_labels()}
    bad = []
    for name, tree in MODULES.items():
        if name.startswith("lorabench.methods"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value in labels:
                bad.append(f"{name}:{node.lineno} {ast.unparse(node)}")
    assert not bad, "declare the pairing on the method config instead: " + "; ".join(bad)
