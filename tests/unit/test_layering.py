"""The package's import structure: layers at the bottom, entry points at the top, no cycles.

Every `import` in the package, at module level or inside a function, is checked against the rank table below:
a module may import modules of its own rank or lower, never higher. The module-level import graph must be acyclic.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mhmoe"

# Lowest first. A module takes the rank of the longest prefix that names it.
RANKS = {
    "mhmoe.errors": 0, "mhmoe.fileio": 0, "mhmoe.configbase": 0, "mhmoe.runtime": 0, "mhmoe.profiling": 0,
    "mhmoe.layers": 1,
    "mhmoe.bitnet": 2, "mhmoe.bitnet.quant": 2, "mhmoe.bitnet.modules": 2,
    "mhmoe.model": 3,
    "mhmoe.complexity": 4, "mhmoe.bitnet.integer": 4, "mhmoe.bitnet.ternary": 4,
    "mhmoe.data": 5,
    "mhmoe.distributed": 6,
    "mhmoe.training": 7,
    "mhmoe.export": 8, "mhmoe.hf": 8, "mhmoe.generate": 8, "mhmoe.bench": 8,
    "mhmoe.reproduction": 8,  # the paper's reproduction: matrix, verdicts, report
    "mhmoe.cli": 9,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def rank(module: str) -> int:
    if module == "mhmoe":  # the public API: the layer family and its config error
        return 1
    best = max((p for p in RANKS if module == p or module.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"{module} has no rank: add it to RANKS in {Path(__file__).name}")
    return RANKS[best]


def imports(path: Path, top_level_only: bool) -> list[tuple[str, int]]:
    """(imported mhmoe module, line) of every import in the file; `from mhmoe.x import y` counts as mhmoe.x.y when
    that is a module, else mhmoe.x."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "mhmoe"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "mhmoe":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                is_module = (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").is_file() or \
                    (PACKAGE.parent / Path(*sub.split("."))).is_dir()
                found.append((sub if is_module else node.module, node.lineno))
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "sample_data" not in p.parts}


def test_every_module_has_a_rank():
    for m in MODULES:
        rank(m)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "mhmoe"))
def test_no_module_imports_a_higher_layer(module):
    mine = rank(module)
    bad = [f"line {line}: {target} (rank {rank(target)})" for target, line in imports(MODULES[module], False)
           if target != "mhmoe" and rank(target) > mine]
    assert not bad, f"{module} (rank {mine}) imports above itself: " + "; ".join(bad)


def test_the_library_never_imports_the_cli():
    offenders = [m for m in MODULES if not m.startswith("mhmoe.cli")
                 for target, _ in imports(MODULES[m], False) if target.startswith("mhmoe.cli")]
    assert not offenders


def test_no_import_cycles():
    graph = {m: {t for t, _ in imports(p, True) if t in MODULES and t != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    """Negative control: the functions above flag what they are meant to flag."""
    assert rank("mhmoe.layers.moe") < rank("mhmoe.training.loop")
    f = tmp_path / "x.py"
    f.write_text("def g():\n    from mhmoe.training.loop import train\n")
    assert imports(f, False) == [("mhmoe.training.loop", 2)] and imports(f, True) == []


# What `import mhmoe.cli` (every `mhmoe` process) must not load: torch.compile's frontend and torch.distributed's
# FSDP2 / DTensor / distributed checkpoints are imported where they are used (layers/compile_boundary.py,
# distributed/parallel.py, distributed/dcp.py), together about 1.8 s of CPU per process otherwise.
HEAVY_AT_IMPORT = ("torch._dynamo", "torch.distributed.tensor", "torch.distributed.fsdp",
                   "torch.distributed.checkpoint")


def test_importing_the_package_and_cli_loads_no_compiler_or_sharding_stack():
    import subprocess
    import sys

    code = ("import sys, mhmoe, mhmoe.cli, mhmoe.training.loop\n"
            f"print(','.join(m for m in {HEAVY_AT_IMPORT!r} if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=PACKAGE.parent)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "", f"imported at start-up: {res.stdout.strip()}"
