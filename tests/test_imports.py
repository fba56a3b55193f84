"""core/ must never import gradio or ui/ (the engine runs headless, in a subprocess of the app)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = r"""
import importlib, importlib.abc, pkgutil, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("gradio", "gradio_client", "ui"):
            raise ImportError(f"core imported {name}")
        return None

sys.meta_path.insert(0, Block())
import core
names = [m.name for m in pkgutil.walk_packages(core.__path__, "core.") if m.name != "core.__main__"]
for name in names:
    importlib.import_module(name)
# The heavy paths too: everything training and sampling touch.
import core.training.train, core.base.sample, core.base.models, core.lora.lora_io, core.training.cache, core.base.tiny
core.base.tiny.build_tokenizer()
import diffusers, transformers, peft, accelerate
from diffusers import StableDiffusionPipeline
print("imported", len(names), "modules")
"""


def test_core_imports_without_gradio():
    out = subprocess.run([sys.executable, "-c", BLOCKER], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "imported" in out.stdout


def test_core_sources_do_not_mention_gradio_imports():
    for path in (ROOT / "core").rglob("*.py"):
        text = path.read_text()
        assert "import gradio" not in text and "from gradio" not in text, path
        assert "from ui" not in text and "import ui" not in text, path


def test_importing_core_is_cheap():
    """No heavy library is loaded at import time (the app imports config to build widgets)."""
    code = ("import sys, core, core.config, core.events, core.cli; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def core_import_graph(root: Path = ROOT / "core") -> dict[str, set[str]]:
    """Module -> the core modules it imports, at the top or inside functions (read from the source)."""
    import ast

    sources: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        sources[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for module, path in sources.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "core":
                # "from core.data import dataset" imports the module core.data.dataset
                named = {f"{node.module}.{a.name}" for a in node.names} & set(sources)
                deps |= named or {node.module}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("core.")}
        graph[module] = deps - {module}
    return graph


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same imports between core's subpackages (core.data, core.training, ...); top-level modules
    (config, events, cli, ...) stay themselves."""
    def package(module: str) -> str:
        parts = module.split(".")
        return ".".join(parts[:2])

    packages: dict[str, set[str]] = {}
    for module, deps in graph.items():
        packages.setdefault(package(module), set()).update(package(d) for d in deps)
    return {name: deps - {name} for name, deps in packages.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or round a circle (Tarjan's strongly connected parts)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, ()):
            if other not in graph:
                continue
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            part = []
            while True:
                other = stack.pop()
                part.append(other)
                if other == node:
                    break
            if len(part) > 1:
                cycles.append(sorted(part))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_core_has_no_import_circles():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # it can see one
    graph = core_import_graph()
    assert len(graph) > 20
    assert import_cycles(graph) == []
    packages = package_graph(graph)
    assert {"core.data", "core.captioning", "core.base", "core.lora", "core.training"} <= set(packages)
    assert import_cycles(packages) == []  # nor between the subpackages and the top-level modules


def test_no_function_outside_the_tests_is_over_100_lines():
    import ast

    long = []
    for path in [*(ROOT / "core").rglob("*.py"), *(ROOT / "ui").rglob("*.py"), ROOT / "launch.py"]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 100:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert long == []
