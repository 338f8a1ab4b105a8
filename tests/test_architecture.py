"""The package's imports point only downward (docs/architecture.md): no cycle, and no layer imports a higher one.

Every `import` and `from ... import` in minidiff/ counts, at module level or inside a function: an import
deferred to dodge a cycle is still a cycle. `from minidiff import X` imports the package itself
(minidiff/__init__.py), the top of the house.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "minidiff"

# Bottom to top. A module may import its own part and the parts listed before it, never one listed after.
LAYERS = [
    "minidiff.data",
    "minidiff.utils",
    "minidiff.checkpoints",
    "minidiff.configuration",
    "minidiff.tokenizer",
    "minidiff.models",
    "minidiff.schedulers",
    "minidiff.training",
    "minidiff.loaders",
    "minidiff.pipelines",
    "minidiff.viz",
    "minidiff.lab",
    "minidiff.sweep",
    "minidiff.cli",
    "minidiff.__main__",
    "minidiff",  # the package's __init__: re-exports everything
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The minidiff modules `name` imports anywhere in its file (a name imported from a package counts as the
    package unless it is a module of its own)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import minidiff.models.vae` -> that module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported_modules(name, path, set(found)) for name, path in found.items()}


def layer_of(name: str) -> int:
    matches = [index for index, layer in enumerate(LAYERS) if name == layer or name.startswith(layer + ".")]
    assert matches, f"{name} belongs to no layer: add its folder to LAYERS here and to docs/architecture.md"
    return max(matches)


def strongly_connected_components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups of modules that import each other, directly or around a loop."""
    index, lowlink, on_stack, stack, components, counter = {}, {}, set(), [], [], [0]

    def visit(node: str) -> None:
        index[node] = lowlink[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                lowlink[node] = min(lowlink[node], lowlink[target])
            elif target in on_stack:
                lowlink[node] = min(lowlink[node], index[target])
        if lowlink[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return components


def test_no_import_cycle():
    cycles = [component for component in strongly_connected_components(import_graph()) if len(component) > 1]
    assert not cycles, "modules that import each other (directly or around a loop): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_every_import_points_down_or_sideways_within_a_part():
    upward = [
        f"{name} ({LAYERS[layer_of(name)]}) imports {target} ({LAYERS[layer_of(target)]})"
        for name, targets in import_graph().items()
        for target in targets
        if layer_of(target) > layer_of(name)
    ]
    assert not upward, "imports that point up the layers:\n" + "\n".join(sorted(upward))


def test_the_checker_sees_deferred_and_relative_imports(tmp_path):
    # the test itself must not be blind: a function-level import of the package from a low module is caught
    graph = {"minidiff.utils.a": {"minidiff"}, "minidiff": {"minidiff.utils.a"}}
    assert strongly_connected_components(graph)[0] == ["minidiff", "minidiff.utils.a"]
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from minidiff import trace\n    from . import b\n")
    found = imported_modules("minidiff.utils.mod", source, {"minidiff", "minidiff.utils", "minidiff.utils.b"})
    assert found == {"minidiff", "minidiff.utils.b"}


def test_one_module_talks_to_the_hub():
    """checkpoints/hub.py says it is the one place minidiff calls huggingface_hub: every other module goes through it."""
    callers = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            imported = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                        else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(module.split(".")[0] == "huggingface_hub" for module in imported):
                callers.append(name)
    assert sorted(set(callers)) == ["minidiff.checkpoints.hub"]


def test_sd15_config_lives_with_the_bundled_configs_and_keeps_its_old_address():
    from minidiff.checkpoints import single_file_layout
    from minidiff.data import SD15_CONFIGS, sd15_config

    assert single_file_layout.sd15_config is sd15_config and single_file_layout.SD15_CONFIGS == SD15_CONFIGS
    assert sd15_config("scheduler")["_class_name"] == "PNDMScheduler"
    sources = {name: path.read_text(encoding="utf-8") for name, path in modules().items()}
    assert not [name for name, text in sources.items() if "single_file_layout import sd15_config" in text]
