"""The shape of the package: one package per layer, imports that only go down, no cycle (function-
level imports included), no job importing another job, no module over 500 lines, and every module
in README's map. Each rule is also run on a copy of the package with a violation planted, so a
checker that stopped seeing violations would fail here too."""

import ast
import os
import re
import shutil

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PACKAGE = os.path.join(ROOT, "fvdm_jax")
MAX_LINES = 500
# Only these live at the top of the package; everything else is in a layer's package.
TOP_LEVEL = {"__init__.py", "main.py", "errors.py"}

# Each layer and the layers it may import (besides itself), lowest first. The engine is everything
# from runtime to evaluation; config checks a config against the engine's registries; the jobs
# (and the command-line entries) sit on top; main dispatches to them.
ENGINE = ("runtime", "models", "diffusion", "data", "convert", "checkpoint", "training", "sampling",
          "evaluation")
ALLOWED = {
    "errors": set(),
    "runtime": {"errors"},
    "models": set(),
    "diffusion": set(),
    "data": {"errors", "runtime"},
    "convert": {"errors", "runtime", "models"},
    "checkpoint": {"errors", "runtime"},
    "training": {"errors", "runtime", "models", "diffusion", "data", "convert", "checkpoint"},
    "sampling": {"errors", "runtime", "models", "diffusion", "data", "convert", "checkpoint", "training"},
    "evaluation": {"errors", "runtime", "models", "diffusion", "data", "convert", "checkpoint", "training",
                   "sampling"},
    "config": {"errors", *ENGINE},
    "jobs": {"errors", "config", *ENGINE},
    "main": {"errors", "config", "jobs", *ENGINE},
}
# Modules that are jobs although their package is an engine layer (a command-line entry).
ENTRY_MODULES = {"fvdm_jax.convert.__main__": "jobs", "fvdm_jax.experiments": "jobs"}


def modules(package: str = PACKAGE) -> dict[str, str]:
    root = os.path.dirname(package)
    found = {}
    for folder, _, names in os.walk(package):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                found[module.removesuffix(".__init__")] = path
    return found


def imports(path: str, known) -> set[str]:
    """The project modules `path` imports anywhere in it (function bodies too); `from package
    import submodule` counts as the submodule."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fvdm_jax"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fvdm_jax"))
    return found


def layer(module: str) -> str:
    for prefix, name in ENTRY_MODULES.items():
        if module == prefix or module.startswith(prefix + "."):
            return name
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "package"


def job_unit(module: str) -> str | None:
    """Which job a module belongs to: each module of jobs/ is one job, experiments/ is one."""
    if module.startswith("fvdm_jax.jobs.") or module == "fvdm_jax.convert.__main__":
        return module
    if module.startswith("fvdm_jax.experiments"):
        return "fvdm_jax.experiments"
    return None


def layer_violations(package: str = PACKAGE) -> list[str]:
    known = modules(package)
    wrong = []
    for module, path in sorted(known.items()):
        own = layer(module)
        for target in sorted(imports(path, known)):
            if target == "fvdm_jax" or target == module:
                continue
            theirs = layer(target)
            if theirs != own and theirs not in ALLOWED.get(own, set()):
                wrong.append(f"{module} ({own}) imports {target} ({theirs})")
            mine, other = job_unit(module), job_unit(target)
            if mine and other and mine != other:
                wrong.append(f"job {module} imports another job's module {target}")
    return wrong


def cycles(package: str = PACKAGE) -> list[list[str]]:
    known = modules(package)
    graph = {m: {i for i in imports(p, known) if i in known and i != m} for m, p in known.items()}
    # A package's __init__ importing its own submodules is how packages work, not a cycle.
    for module in graph:
        graph[module] = {i for i in graph[module] if not (module + ".").startswith(i + ".")}
    state, found = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_every_module_sits_in_a_layer_and_only_three_at_the_top():
    top = {n for n in os.listdir(PACKAGE) if n.endswith(".py")}
    assert top <= TOP_LEVEL, f"modules at the top of fvdm_jax/: {sorted(top - TOP_LEVEL)}"
    unplaced = sorted(m for m in modules() if layer(m) not in ALLOWED and m != "fvdm_jax")
    assert not unplaced, f"modules of no layer: {unplaced}"


def test_imports_only_go_down_and_no_job_imports_another():
    assert not layer_violations()


def test_no_import_cycle_function_level_imports_included():
    assert not cycles()


@pytest.fixture
def planted(tmp_path):
    """A copy of the package; plant(module_path, line) appends an import to one of its files."""
    copy = tmp_path / "fvdm_jax"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))

    def plant(relative: str, line: str) -> str:
        with open(copy / relative, "a", encoding="utf-8") as f:
            f.write(f"\n\ndef _planted():\n    {line}\n")
        return str(copy)

    return plant


@pytest.mark.parametrize("relative, line, expected", [
    ("jobs/train.py", "from fvdm_jax.jobs import sample", "job fvdm_jax.jobs.train imports another job"),
    ("runtime/files.py", "from fvdm_jax.training import loop", "fvdm_jax.runtime.files (runtime) imports"),
    ("training/loop.py", "from fvdm_jax.sampling import sampler", "(training) imports fvdm_jax.sampling"),
    ("models/dit.py", "from fvdm_jax.runtime import sharding", "(models) imports fvdm_jax.runtime"),
    ("diffusion/samplers.py", "from fvdm_jax.errors import ConfigError", "(diffusion) imports fvdm_jax.errors"),
    ("training/step.py", "from fvdm_jax.config import checks", "(training) imports fvdm_jax.config.checks"),
])
def test_the_layer_check_sees_a_planted_violation(planted, relative, line, expected):
    found = layer_violations(planted(relative, line))
    assert any(expected in v for v in found), found


def test_the_cycle_check_sees_a_planted_function_level_cycle(planted):
    # data.video is imported by data.media; a function-level import back closes a circle.
    found = cycles(planted("data/video.py", "from fvdm_jax.data import media"))
    assert any("fvdm_jax.data.video" in c and "fvdm_jax.data.media" in c for c in found), found


def test_no_module_is_over_500_lines():
    long = {m: n for m, p in modules().items()
            if (n := sum(1 for _ in open(p, encoding="utf-8"))) > MAX_LINES}
    assert not long


def test_readme_maps_every_module():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme.split("## What is here", 1)[1].split("\n## ", 1)[0]
    mapped = set(re.findall(r"`(fvdm_jax/[\w/]+\.py)`", section))
    missing = sorted(os.path.relpath(p, ROOT) for m, p in modules().items()
                     if not p.endswith("__init__.py") and os.path.relpath(p, ROOT) not in mapped)
    assert not missing, f"README's 'What is here' table lacks {missing}"
    stale = sorted(p for p in mapped if not os.path.exists(os.path.join(ROOT, p)))
    assert not stale, f"README's 'What is here' table names modules that do not exist: {stale}"
