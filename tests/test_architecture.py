"""The shape of the package: one-way imports (jobs on top, the engine below), no import cycle at
module level, no module over 500 lines, and every module in README's map."""

import ast
import os
import re

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PACKAGE = os.path.join(ROOT, "fvdm_jax")
MAX_LINES = 500
# The layer on top: command line, jobs, experiments. Everything else is the engine.
JOB_PREFIXES = ("fvdm_jax.main", "fvdm_jax.jobs", "fvdm_jax.experiments", "fvdm_jax.convert.__main__")


def _modules() -> dict[str, str]:
    found = {}
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[module.removesuffix(".__init__")] = path
    return found


def _imports(path: str, modules, top_level_only: bool) -> set[str]:
    """The project modules `path` imports (a `from package import submodule` counts as the
    submodule); with top_level_only, only those imported when the module itself is imported."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fvdm_jax"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fvdm_jax"))
    return found


def _is_job(module: str) -> bool:
    return module.startswith(JOB_PREFIXES)


def test_the_engine_never_imports_a_job():
    modules = _modules()
    wrong = {m: sorted(i for i in _imports(p, modules, False) if _is_job(i))
             for m, p in modules.items() if not _is_job(m)}
    assert not {m: i for m, i in wrong.items() if i}


def test_module_level_imports_have_no_cycle():
    modules = _modules()
    graph = {m: {i for i in _imports(p, modules, True) if i in modules and i != m}
             for m, p in modules.items()}
    # A package's __init__ importing its own submodules is how packages work, not a cycle.
    for module in graph:
        graph[module] = {i for i in graph[module] if not (module + ".").startswith(i + ".")
                         or i == module}
    state, cycles = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles


def test_no_module_is_over_500_lines():
    long = {m: n for m, p in _modules().items()
            if (n := sum(1 for _ in open(p, encoding="utf-8"))) > MAX_LINES}
    assert not long


def test_readme_maps_every_module():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme.split("## What is here", 1)[1].split("\n## ", 1)[0]
    mapped = set(re.findall(r"`(fvdm_jax/[\w/]+\.py)`", section))
    missing = sorted(os.path.relpath(p, ROOT) for m, p in _modules().items()
                     if not p.endswith("__init__.py") and os.path.relpath(p, ROOT) not in mapped)
    assert not missing, f"README's 'What is here' table lacks {missing}"
