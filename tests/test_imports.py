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
import core.train, core.sample, core.models, core.lora_io, core.cache, core.tiny
core.tiny.build_tokenizer()
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
