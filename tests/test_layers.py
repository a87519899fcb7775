"""The package's layering (docs/design.md): no file imports from a layer above its own, and no import
cycle, counting imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "perceiver_fast"
COMPILED = "_C"  # the C++ extension, built from csrc/: below every layer

# Bottom to top; a module belongs to the first entry that is it or its package.
LAYERS = [
    ["arguments", "extension", "dropout", "flops", "reference", "kernels", "peak_memory", "shards"],
    ["validation"],
    ["ops"],
    ["backends"],
    ["dispatch"],
    ["attention", "input_attention", "linear"],
    ["explain", "nn"],
    ["patching", "generation"],
    ["__init__"],  # the package's face, `import perceiver_fast as pf`
    ["bench", "profiler", "installation"],
    ["cli"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts)


def layer_of(module: str) -> int:
    head = module.split(".")[0] if module else "__init__"
    for index, names in enumerate(LAYERS):
        if head in names:
            return index
    raise AssertionError(f"perceiver_fast.{module} is in no layer of tests/test_layers.py")


def imports_of(path: Path) -> set[str]:
    """perceiver_fast modules (relative names, "" for the package face) that the file imports."""
    package = module_name(path).split(".")[:-1]  # the folder the file is in, for a package's __init__ too
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "perceiver_fast":
                target = node.module.partition(".")[2]
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                is_module = sub == COMPILED or (PACKAGE / (sub.replace(".", "/") + ".py")).exists() \
                    or (PACKAGE / sub.replace(".", "/")).is_dir()
                found.add(sub if is_module else target)
        elif isinstance(node, ast.Import):
            found |= {a.name.partition(".")[2] for a in node.names if a.name.split(".")[0] == "perceiver_fast"}
    return found


def graph() -> dict[str, set[str]]:
    edges = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path).removesuffix(".__init__")
        edges[name] = {t.removesuffix(".__init__") for t in imports_of(path)} - {name, COMPILED}
    return edges


def test_no_file_imports_from_a_layer_above():
    upward = [f"perceiver_fast.{source} -> perceiver_fast.{target or '(package face)'}"
              for source, targets in graph().items() for target in targets
              if layer_of(target) > layer_of(source)]
    assert not upward, "imports running up the layers:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    edges = graph()
    modules = {m for m in edges} | {t for ts in edges.values() for t in ts}

    def expand(target):
        # An import of a package reaches its __init__; one of a name inside a module reaches that module.
        return target if target in edges else next((m for m in edges if target.startswith(m + ".")), target)

    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for target in map(expand, edges.get(node, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for module in sorted(modules):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_layer_table_knows_every_module():
    for module in graph():
        layer_of(module)
