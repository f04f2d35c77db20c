"""The package's layers: no import cycles among src/ebdiff's modules, counting imports inside functions too
(a function-local import hides an arrow, it does not remove it), and the pure, sampler and model layers
never reach the training loop, the launchers or evaluation."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "ebdiff"
PKG = "ebdiff"


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = [PKG, *p.relative_to(ROOT).with_suffix("").parts]
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


MODULES = _modules()
PACKAGES = {m for m, p in MODULES.items() if p.name == "__init__.py"}


def _known(name: str) -> str | None:
    """The longest module of the package that `name` is or lies in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """Every ebdiff module `module` imports, at the top or inside a function, relative or absolute."""
    base = module.split(".") if module in PACKAGES else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            where = (".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
                     if node.level else node.module or "")
            names = [f"{where}.{a.name}" for a in node.names] + [where]
        else:
            continue
        for name in names:
            if name.split(".")[0] == PKG:
                k = _known(name)
                if k not in (None, module) and not (k == PKG and name != PKG):
                    found.add(k)
    # `from . import x` names x, not the package (a package's edges to its own children are kept: importing
    # `ebdiff.data.datasets` runs `data/__init__.py`, which imports `hf` and `latents`)
    return {m for m in found if m != PKG}


GRAPH = {m: _imports(m) for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_cycle_finder_finds_a_cycle_and_only_that():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize("cycle", [pytest.param(c, id="-".join(c)) for c in _cycles(GRAPH)] or [None])
def test_no_import_cycle(cycle):
    assert cycle is None, f"import cycle among {', '.join(cycle)}"


# The layers, lowest first (README "Architecture"): a module imports its own layer and those below, never one
# above. The foundation modules and config.py sit at the package root; the application layer is `app` and
# the CLI.
LAYERS = ("errors", "files", "progress", "core", "backbones", "pruning", "data", "config", "runs", "training",
          "evaluate", "app", "cli")


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[1]) if "." in module else len(LAYERS)


def test_every_layer_is_a_module_or_folder_of_the_package():
    tops = {m.split(".")[1] for m in MODULES if "." in m}
    assert tops == set(LAYERS), f"not placed in a layer: {sorted(tops - set(LAYERS))}"


def test_every_import_goes_down_the_layers():
    up = sorted(f"{m} -> {t}" for m, deps in GRAPH.items() for t in deps
                if m != PKG and _layer(t) > _layer(m))
    assert not up, "imports that go up a layer:\n" + "\n".join(up)


def test_the_layer_check_sees_an_upward_import():
    assert _layer("ebdiff.core.sampling") < _layer("ebdiff.runs.interop") < _layer("ebdiff.app.assemble")


LOW = ("core", "backbones", "pruning", "data", "config")  # the pure, sampler and model layers
HIGH = ("training", "evaluate", "app", "cli")


def _in(module: str, layer: tuple[str, ...]) -> bool:
    first = module.split(".")[1] if "." in module else ""
    return first in layer


def _reachable(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for t in GRAPH.get(todo.pop(), ()):
            if t not in seen:
                seen.add(t)
                todo.append(t)
    return seen


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _in(m, LOW)))
def test_pure_sampler_and_model_layers_do_not_reach_training_or_evaluation(module):
    bad = sorted(t for t in _reachable(module) if _in(t, HIGH))
    assert not bad, f"{module} imports (directly or through others) {', '.join(bad)}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _in(m, ("training",))))
def test_training_never_imports_evaluation(module):
    bad = sorted(t for t in _reachable(module) if _in(t, ("evaluate", "app")))
    assert not bad, f"{module} imports (directly or through others) {', '.join(bad)}"


# config.choices() looks these registries up
REGISTRIES = ("ebdiff.backbones", "ebdiff.data", "ebdiff.data.datasets", "ebdiff.pruning.engine",
              "ebdiff.core.regions", "ebdiff.core.sampling")


@pytest.mark.parametrize("module", REGISTRIES)
def test_the_registries_config_lists_import_no_config_and_no_training(module):
    assert module in MODULES
    bad = sorted(t for t in _reachable(module) if t == "ebdiff.config" or _in(t, HIGH))
    assert not bad, f"{module} imports (directly or through others) {', '.join(bad)}"


def test_no_subpackage_shadows_a_public_name():
    """`ebdiff.train` is a function of the API: a subpackage of that name would replace it once imported."""
    import ebdiff

    assert not [n for n in ebdiff.__all__ if (ROOT / n).is_dir() or (ROOT / f"{n}.py").is_file()]


def test_the_loop_and_the_cli_stay_small():
    """Trainer is only the loop (< 200 lines), the CLI only parses and prints (< 400), and no function is over
    80 lines: what grows past these belongs in a start strategy, a hook or a library function."""
    long = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            size = (node.end_lineno or node.lineno) - node.lineno + 1 if hasattr(node, "lineno") else 0
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and size > 80:
                long.append(f"{module}.{node.name}: {size} lines")
            if isinstance(node, ast.ClassDef) and node.name == "Trainer":
                assert size < 200, f"Trainer has {size} lines"
    assert not long, "functions over 80 lines: " + ", ".join(long)
    assert len((ROOT / "cli.py").read_text().splitlines()) < 400
