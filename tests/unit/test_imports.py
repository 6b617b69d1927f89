"""The import graph of ptm_dist, read from the source with ast (module-level imports and the
ones inside functions alike, relative imports resolved): no cycles, no module imports the CLI,
nobody imports another module's underscore names, Ray internals only in launch.py, and no
import goes up the layer order below.

Each check is a plain function of the parsed imports; the self-tests at the end run them on a
small synthetic package written to a temporary directory, so every check is shown to fail."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "ptm_dist"  # the source tree, not an installed copy

# Lower number = lower layer; a module may import its own layer or lower ones. A name ending in
# ".*" covers a package and everything under it. Package roots without code of their own
# (ptm_dist.train, ptm_dist.finetune) sit at layer 0, like ptm_dist itself: importing any of
# their modules imports them first.
LAYERS: dict[int, tuple[str, ...]] = {
    0: ("ptm_dist", "ptm_dist.train", "ptm_dist.finetune", "ptm_dist.errors", "ptm_dist.faults",
        "ptm_dist.space", "ptm_dist.progress", "ptm_dist.sizes", "ptm_dist.models", "ptm_dist.dist",
        "ptm_dist.compact"),
    1: ("ptm_dist.storage", "ptm_dist.config"),
    2: ("ptm_dist.checkpoint", "ptm_dist.lease", "ptm_dist.stopping", "ptm_dist.tracking", "ptm_dist.engine",
        "ptm_dist.runlogs", "ptm_dist.launch", "ptm_dist.data.*"),
    3: ("ptm_dist.export", "ptm_dist.pretrained", "ptm_dist.report", "ptm_dist.plan", "ptm_dist.train.step",
        "ptm_dist.train.reshard",
        "ptm_dist.train.spec", "ptm_dist.finetune.task", "ptm_dist.finetune.tagging", "ptm_dist.finetune.worker",
        "ptm_dist.harness"),
    4: ("ptm_dist.train.loop", "ptm_dist.train.entry", "ptm_dist.train.local", "ptm_dist.train.pretrain",
        "ptm_dist.finetune.driver",
        "ptm_dist.finetune.run", "ptm_dist.finetune.sweep", "ptm_dist.bench", "ptm_dist.bench_init",
        "ptm_dist.submit", "ptm_dist.generate"),
    5: ("ptm_dist.pipeline", "ptm_dist.evaluate", "ptm_dist.bench_job", "ptm_dist.bench_ckpt"),
    6: ("ptm_dist.cli",),
}
RAY_INTERNALS_ALLOWED_IN = {"ptm_dist.launch"}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (absolute dotted path; for `from m import x`, m, or m.x when a module)
    names: tuple[str, ...]  # names taken by `from m import ...` that are not modules
    line: int
    text: str  # the statement as written

    def __str__(self) -> str:
        return f"{self.source} line {self.line}: {self.text}"


def module_names(root: Path, package: str) -> dict[str, Path]:
    """{dotted module name: file} for every .py file of the package rooted at ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join((package, *parts))] = path
    return out


def parse_imports(root: Path, package: str) -> tuple[dict[str, Path], list[Import]]:
    """Every import statement anywhere in the package's modules (inside functions, classes, if
    blocks and try blocks too), with relative imports made absolute."""
    modules = module_names(root, package)
    found = []
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        here = name if is_pkg else name.rpartition(".")[0]  # the package relative imports start from
        source = path.read_text()
        for node in ast.walk(ast.parse(source, filename=str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            text = ast.get_source_segment(source, node) or ""
            if isinstance(node, ast.Import):
                for alias in node.names:
                    found.append(Import(name, alias.name, (), node.lineno, text))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join([*base, node.module] if node.module else base)
                else:
                    mod = node.module or ""
                plain = []
                for alias in node.names:
                    sub = f"{mod}.{alias.name}"
                    if sub in modules:  # `from pkg import submodule`
                        found.append(Import(name, sub, (), node.lineno, text))
                    else:
                        plain.append(alias.name)
                if plain or not node.names:
                    found.append(Import(name, mod, tuple(plain), node.lineno, text))
    return modules, found


def internal_graph(modules: dict[str, Path], imports: list[Import]) -> dict[str, set[str]]:
    """Module -> the package modules it imports. Importing a.b.c runs a and a.b first, so an
    import also reaches the target's parent packages."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        parts = imp.target.split(".")
        for i in range(1, len(parts) + 1):
            target = ".".join(parts[:i])
            if target in modules and target != imp.source:
                graph[imp.source].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a list of modules, first == last) per strongly connected component of more
    than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = set()
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.add(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        components.append(comp)
    cycles = []
    for comp in components:  # a concrete cycle inside the component: shortest path back to the start
        start = min(comp)
        paths = {start: [start]}
        todo = [start]
        cycle = None
        while todo and cycle is None:
            node = todo.pop(0)
            for child in sorted(graph[node] & comp):
                if child == start:
                    cycle = paths[node] + [start]
                    break
                if child not in paths:
                    paths[child] = paths[node] + [child]
                    todo.append(child)
        cycles.append(cycle)
    return cycles


def cli_imports(imports: list[Import], cli: str = "ptm_dist.cli") -> list[Import]:
    return [i for i in imports if i.source != cli and (i.target == cli or i.target.startswith(cli + "."))]


def private_imports(imports: list[Import], package: str = "ptm_dist") -> list[Import]:
    """`from <package module> import _name` of another module's underscore name (dunders aside)."""
    return [i for i in imports
            if (i.target == package or i.target.startswith(package + ".")) and i.target != i.source
            and any(n.startswith("_") and not n.endswith("__") for n in i.names)]


def ray_internal_imports(imports: list[Import], allowed: set[str] = RAY_INTERNALS_ALLOWED_IN) -> list[Import]:
    """Imports of a module path under ray with a component starting with "_" (ray._private,
    ray.train.v2._internal, `from ray.x import _y`), outside the allowed modules."""
    def internal(i: Import) -> bool:
        parts = i.target.split(".")
        return parts[0] == "ray" and any(p.startswith("_") for p in [*parts[1:], *i.names])

    return [i for i in imports if i.source not in allowed and internal(i)]


def layer_of(module: str, layers: dict[int, tuple[str, ...]] = LAYERS) -> int | None:
    for layer, names in layers.items():
        for n in names:
            if module == n or (n.endswith(".*") and (module == n[:-2] or module.startswith(n[:-1]))):
                return layer
    return None


def upward_imports(modules: dict[str, Path], imports: list[Import],
                   layers: dict[int, tuple[str, ...]] = LAYERS) -> list[str]:
    """Imports of a module in a higher layer than the importer's (implicit parent-package
    imports included), and modules no layer names."""
    out = [f"{m}: in no layer of the test's LAYERS" for m in modules if layer_of(m, layers) is None]
    for imp in imports:
        parts = imp.target.split(".")
        for k in range(1, len(parts) + 1):
            target = ".".join(parts[:k])
            if target not in modules or target == imp.source:
                continue
            src, dst = layer_of(imp.source, layers), layer_of(target, layers)
            if src is not None and dst is not None and dst > src:
                out.append(f"{imp} (layer {src} imports {target}, layer {dst})")
    return out


# ---------------------------------------------------------------- the package


@pytest.fixture(scope="module")
def parsed():
    modules, imports = parse_imports(PACKAGE_DIR, "ptm_dist")
    assert "ptm_dist.cli" in modules and "ptm_dist.data.packing" in modules and len(imports) > 50
    return modules, imports


def test_no_import_cycles(parsed):
    cycles = find_cycles(internal_graph(*parsed))
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_nothing_imports_the_cli(parsed):
    bad = cli_imports(parsed[1])
    assert bad == [], "\n".join(map(str, bad))


def test_no_module_imports_another_modules_private_names(parsed):
    bad = private_imports(parsed[1])
    assert bad == [], "\n".join(map(str, bad))


def test_ray_internals_only_in_launch(parsed):
    bad = ray_internal_imports(parsed[1])
    assert bad == [], "\n".join(map(str, bad))


def test_every_module_has_a_layer_and_imports_only_downward(parsed):
    bad = upward_imports(*parsed)
    assert bad == [], "\n".join(bad)


# ---------------------------------------------------------------- the checks can fail

SYNTHETIC = {
    "__init__.py": "",
    "errors.py": "from pkg import config\n",  # upward: layer 0 -> 1
    "config.py": "def f():\n    from .engine import _helper\n",  # private, inside a function
    "engine.py": "import pkg.errors\nfrom . import cli\n",  # imports the CLI
    "cli.py": "from pkg.engine import run\n",
    "data/__init__.py": "",
    "data/a.py": "from ..data import b\n",  # cycle a -> b -> a through relative imports
    "data/b.py": "class C:\n    def m(self):\n        from pkg.data.a import x\n",
    "launch.py": "from ray.train.v2._internal import constants\n",
    "tracking.py": "import ray._private.worker\nfrom ray.train import _internal\nimport ray.data\n",
}
SYNTHETIC_LAYERS = {0: ("pkg", "pkg.errors"), 1: ("pkg.config",), 2: ("pkg.engine", "pkg.data.*", "pkg.launch",
                                                                         "pkg.tracking"), 3: ("pkg.cli",)}


@pytest.fixture
def synthetic(tmp_path):
    for rel, text in SYNTHETIC.items():
        (tmp_path / "pkg" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / rel).write_text(text)
    return parse_imports(tmp_path / "pkg", "pkg")


def test_checks_catch_a_cycle_through_relative_and_function_level_imports(synthetic):
    modules, imports = synthetic
    cycles = find_cycles(internal_graph(modules, imports))
    assert sorted(cycles) == [["pkg.cli", "pkg.engine", "pkg.cli"], ["pkg.data.a", "pkg.data.b", "pkg.data.a"]]
    assert find_cycles({"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}) == [["x", "y", "z", "x"]]
    assert find_cycles({"x": {"y"}, "y": set()}) == []


def test_checks_catch_cli_private_and_ray_internal_imports(synthetic):
    _, imports = synthetic
    assert [(i.source, i.line) for i in cli_imports(imports, "pkg.cli")] == [("pkg.engine", 2)]
    assert [(i.source, i.target, i.names) for i in private_imports(imports, "pkg")] == [
        ("pkg.config", "pkg.engine", ("_helper",))]
    bad = ray_internal_imports(imports, {"pkg.launch"})
    assert sorted((i.source, i.line) for i in bad) == [("pkg.tracking", 1), ("pkg.tracking", 2)]
    assert ray_internal_imports(imports, set())[0].source == "pkg.launch"


def test_checks_catch_upward_imports_and_unplaced_modules(synthetic):
    modules, imports = synthetic
    bad = upward_imports(modules, imports, SYNTHETIC_LAYERS)
    assert sorted(bad) == [
        "pkg.config line 2: from .engine import _helper (layer 1 imports pkg.engine, layer 2)",
        "pkg.engine line 2: from . import cli (layer 2 imports pkg.cli, layer 3)",
        "pkg.errors line 1: from pkg import config (layer 0 imports pkg.config, layer 1)",
    ]
    del SYNTHETIC_LAYERS[3]
    try:
        assert upward_imports(modules, imports, SYNTHETIC_LAYERS)[0] == "pkg.cli: in no layer of the test's LAYERS"
    finally:
        SYNTHETIC_LAYERS[3] = ("pkg.cli",)
