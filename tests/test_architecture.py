"""The shape of the codebase: no import cycles between project modules, no dev-only library in the runtime, a
train.py short enough to read in one sitting. Read from the source with `ast`: nothing is imported."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("train.py", "generate.py")
PACKAGES = ("model", "peft", "quant", "dist", "data", "bench", "tests")
RUNTIME = ("train", "generate", "model", "peft", "quant", "dist", "data")
# used by tests and benchmarks as references, never needed to train or generate
DEV_ONLY = ("transformers", "accelerate", "trl", "bitsandbytes")
TRAIN_MAX_LINES = 500


def project_modules() -> dict[str, Path]:
    """Module name -> file, for train.py, generate.py and every .py under the project's directories
    (`x/__init__.py` is module `x`)."""
    mods = {Path(s).stem: ROOT / s for s in SCRIPTS}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def imported_names(name: str, path: Path):
    """(line, dotted module, names) for every import statement anywhere in the file (module level, in functions,
    under `if`), relative imports resolved against `name`; names is () for a plain `import a.b`."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            yield node.lineno, module, tuple(a.name for a in node.names)


def import_graph() -> dict[str, dict[str, str]]:
    """module -> {imported project module: "file:line" of the first import statement that makes the edge}.

    `import a.b.c` runs a, a.b and a.b.c, so it is an edge to each that is a project module; `from p import n` is
    an edge to p and, when p/n.py exists, to p.n. A module's edges to its own enclosing packages are left out:
    when `model.io` runs, the package `model` is already being imported (that is how Python got to model.io),
    so `from .model import X` inside it needs model/model.py, not model/__init__.py. An explicit
    `from model import X` of a name defined in model/__init__.py, from outside the package, stays an edge."""
    mods = project_modules()
    graph = {}
    for name, path in mods.items():
        edges = {}
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        if path.name == "__init__.py":
            own.add(name)
        for line, module, names in imported_names(name, path):
            parts = module.split(".")
            targets = {".".join(parts[:i]) for i in range(1, len(parts) + 1)} - own
            targets |= {f"{module}.{n}" for n in names}
            if module in own and names and all(f"{module}.{n}" in mods for n in names):
                targets.discard(module)  # `from . import sibling`: the package is already running
            elif module in own and names:
                targets.add(module)      # a name from an enclosing package's __init__
            for t in sorted(targets & mods.keys()):
                if t != name:
                    edges.setdefault(t, f"{path.relative_to(ROOT)}:{line}")
        graph[name] = edges
    return graph


def knots(graph: dict[str, dict]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan): each holds at least one cycle."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while v not in comp:
                comp.add(stack.pop())
            on_stack.difference_update(comp)
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(comps, key=min)


def cycle_in(graph: dict[str, dict], knot: set[str]) -> list[str]:
    """The shortest cycle [a, ..., a] from the knot's first module back to itself (breadth-first inside it)."""
    start = min(knot)
    prev, frontier = {}, [start]
    while start not in prev:
        reached = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w in knot and w not in prev:
                    prev[w] = v
                    reached.append(w)
        frontier = reached
    path, v = [start], prev[start]
    while v != start:
        path.append(v)
        v = prev[v]
    return [start] + path[:0:-1] + [start]


def cycles(graph: dict[str, dict]) -> list[list[str]]:
    """One cycle through each knot."""
    return [cycle_in(graph, k) for k in knots(graph)]


def package_graph(graph: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """The module graph folded onto top-level packages and scripts (model, peft, ..., train): the layering."""
    out = {}
    for a, edges in graph.items():
        pa = out.setdefault(a.split(".")[0], {})
        for b, where in edges.items():
            if b.split(".")[0] != a.split(".")[0]:
                pa.setdefault(b.split(".")[0], f"{where}: {a} imports {b}")
    return out


def _report(graph) -> str:
    lines = []
    for knot in knots(graph):
        c = cycle_in(graph, knot)
        lines.append(" -> ".join(c))
        lines += [f"    {a} -> {b}  ({graph[a][b]})" for a, b in zip(c, c[1:])]
        if len(knot) > len(c) - 1:
            lines.append(f"    (more cycles through: {', '.join(sorted(knot))})")
    return "\n".join(lines)


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycle(s) between project modules:\n" + _report(graph)


def test_no_import_cycles_between_packages():
    """A package that imports a script or package which imports it back is a cycle of the layering even when no
    single module closes it (data/default_run.py imports train.py, which imports data/)."""
    graph = package_graph(import_graph())
    found = cycles(graph)
    assert not found, "import cycle(s) between top-level packages:\n" + _report(graph)


def test_cycle_finder_reports_the_cycle():
    graph = {"a": {"b": ""}, "b": {"c": ""}, "c": {"a": "", "d": ""}, "d": {}, "e": {"e2": ""}, "e2": {"e": ""}}
    assert cycles(graph) == [["a", "b", "c", "a"], ["e", "e2", "e"]]
    assert cycles({"a": {"b": ""}, "b": {}}) == []


def test_import_graph_sees_relative_and_nested_imports():
    """Relative imports resolve to the sibling, not to the enclosing package; an import inside a function
    (tokenizer.py reads .gguf files lazily) is an edge like any other."""
    graph = import_graph()
    assert "model.model" in graph["model.io"] and "model" not in graph["model.io"]
    assert {"model.io", "model.model", "model.tokenizer"} <= set(graph["model"])
    assert "model.gguf" in graph["model.tokenizer"]
    assert "model" in graph["train"] and "peft.core" in graph["peft.lora"]


def test_runtime_never_imports_dev_only_libraries():
    """transformers, accelerate, trl and bitsandbytes are test/benchmark references, not dependencies. (Our
    peft/ package shadows Hugging Face's, so `import peft` in project code is ours.)"""
    bad = []
    for name, path in project_modules().items():
        if name.split(".")[0] not in RUNTIME:
            continue
        for line, module, _ in imported_names(name, path):
            if module.split(".")[0] in DEV_ONLY:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "runtime modules import dev-only libraries:\n" + "\n".join(bad)


def test_train_py_is_short():
    n = len((ROOT / "train.py").read_text().splitlines())
    assert n <= TRAIN_MAX_LINES, f"train.py has {n} lines (at most {TRAIN_MAX_LINES}): move code into modules"
