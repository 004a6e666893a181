"""The kit's shape: the import graph of twlib, read from the source (function-level imports included), has
no cycle and no import against the layer order of docs/design.md §11; modules and functions stay small;
every ``docs/design.md §N`` reference names a section that exists."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "twlib"
DESIGN = ROOT / "docs" / "design.md"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _targets(module: str, node: ast.AST) -> list[str]:
    """The kit modules an import statement names (``from . import x`` may name a submodule or the package)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            package = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
            parts = package.split(".")[:len(package.split(".")) - node.level + 1]
            base = ".".join(parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    out = []
    for name in names:
        while name not in MODULES and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in MODULES and name != module:
            out.append(name)
    return out


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[module] = {t for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                         for t in _targets(module, node)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def design_layers() -> list[tuple[str, list[str]]]:
    """The layer table of docs/design.md §11: (layer, module patterns), bottom layer first."""
    section = DESIGN.read_text(encoding="utf-8").split("## 11.", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\w+) \| (.+) \|$", section, re.M)
    return [(layer, re.findall(r"`([\w.*]+)`", cells)) for layer, cells in rows if layer != "layer"]


def layer_of(module: str, layers) -> int:
    """Index of the layer holding ``module``: an explicit name wins over a ``name*`` or ``name.*`` pattern."""
    for i, (_, patterns) in enumerate(layers):
        if module in patterns:
            return i
    best = None
    for i, (_, patterns) in enumerate(layers):
        for p in patterns:
            stem = p.rstrip("*").rstrip(".")
            if p.endswith("*") and (module == stem and not p.endswith(".*") or module.startswith(stem + ".")):
                if best is None or len(stem) > best[1]:
                    best = (i, len(stem))
    if best is None:
        raise AssertionError(f"{module} is in no layer of docs/design.md §11")
    return best[0]


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_follow_the_layers_of_the_design():
    layers = design_layers()
    assert [name for name, _ in layers] == ["foundation", "domain", "configuration", "machinery", "stages",
                                            "benchmarks"]
    upward = [f"{m} ({layers[layer_of(m, layers)][0]}) imports {t} ({layers[layer_of(t, layers)][0]})"
              for m, targets in import_graph().items() for t in sorted(targets)
              if layer_of(t, layers) > layer_of(m, layers)]
    assert not upward, "\n".join(upward)


def test_layer_patterns_place_modules_as_written():
    layers = [("low", ["twlib.engines", "twlib.format*"]), ("high", ["twlib.engines.*", "twlib.rewriter.chat"]),
              ("top", ["twlib.rewriter*"])]
    assert layer_of("twlib.engines", layers) == 0 and layer_of("twlib.engines.hf", layers) == 1
    assert layer_of("twlib.format.parser", layers) == 0 and layer_of("twlib.rewriter.chat", layers) == 1
    assert layer_of("twlib.rewriter.stage1", layers) == 2
    with pytest.raises(AssertionError, match="no layer"):
        layer_of("twlib.nowhere", layers)


def test_modules_and_functions_stay_small():
    big, long = [], []
    for module, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_MODULE_LINES:
            big.append(f"{module}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {n} lines")
    assert not big and not long, "\n".join(big + long)


def _design_sections() -> set[str]:
    return set(re.findall(r"^## (\d+)\. ", DESIGN.read_text(encoding="utf-8"), re.M))


def test_every_design_reference_names_a_section():
    sections = _design_sections()
    assert {"4", "5", "6", "7", "8", "9", "10", "11"} <= sections
    files = [*PACKAGE.rglob("*.py"), *ROOT.glob("notebooks/*.ipynb"), ROOT / "README.md", *ROOT.glob("tests/*.py")]
    refs = [(f.relative_to(ROOT), n) for f in files
            for n in re.findall(r"design\.md §(\d+)", f.read_text(encoding="utf-8"))]
    assert len(refs) >= 20
    dangling = [f"{f}: §{n}" for f, n in refs if n not in sections]
    assert not dangling, dangling
    stale = [str(f.relative_to(ROOT)) for f in files if re.search(r"\bDESIGN §", f.read_text(encoding="utf-8"))]
    assert not stale, f"references to a design document the repository lacks: {stale}"
