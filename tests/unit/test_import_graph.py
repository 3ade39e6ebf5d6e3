"""The library's imports form layers: nothing imports a module of a higher layer, and nothing imports in a
circle, lazy imports inside functions included (a circle hidden by a lazy import is still a circle)."""

from __future__ import annotations

import ast

from tests.conftest import ROOT

SOURCE = ROOT / "ssl"
# Lowest first. A module may import its own layer and those below.
LAYERS = [
    (
        "selfsup",
        "selfsup.errors",
        "selfsup.config",
        "selfsup.dotted",
        "selfsup.distributed",
        "selfsup.reachability",
        "selfsup.ray_cluster",
    ),
    ("selfsup.data",),
    ("selfsup.models",),
    ("selfsup.methods",),
    ("selfsup.params",),
    ("selfsup.eval", "selfsup.sweep"),
    ("selfsup.train",),
    ("selfsup.tracking", "selfsup.serving", "selfsup.embedding", "selfsup.search", "selfsup.service"),
]


def module_names() -> dict[str, object]:
    names = {}
    for path in SOURCE.rglob("*.py"):
        name = ".".join(path.relative_to(SOURCE).with_suffix("").parts).removesuffix(".__init__")
        names[name] = path
    return names


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):  # every import, at module level or in a function
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("selfsup"):
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    imported.add(submodule if submodule in modules else node.module)
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names if alias.name.startswith("selfsup")}
        graph[name] = {other for other in imported if other in modules and other != name}
    return graph


def layer(module: str) -> int:
    matches = [
        (len(prefix), i)
        for i, prefixes in enumerate(LAYERS)
        for prefix in prefixes
        if module == prefix or module.startswith(prefix + ".")
    ]
    assert matches, f"{module} belongs to no layer: add it to LAYERS"
    return max(matches)[1]


def test_every_module_has_a_layer():
    for module in module_names():
        layer(module)


def test_nothing_imports_upward():
    upward = [
        f"{module} (layer {layer(module)}) imports {other} (layer {layer(other)})"
        for module, imported in import_graph().items()
        for other in imported
        if layer(other) > layer(module)
    ]
    assert not upward, "\n".join(upward)


def circles(graph: dict[str, set[str]]) -> list[str]:
    found, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                found.append(" -> ".join(path[path.index(other) :] + [other]))
            elif other not in state:
                visit(other, path + [other])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_there_is_no_import_circle():
    found = circles(import_graph())
    assert not found, "\n".join(found)


def test_the_checker_finds_a_circle():
    # Guards the test above: config -> methods -> simclr -> config, the circle this layout removed.
    graph = {"config": {"methods"}, "methods": {"simclr"}, "simclr": {"config"}, "errors": set()}
    assert circles(graph) == ["config -> methods -> simclr -> config"]
    assert circles({"a": {"b"}, "b": set()}) == []
