"""The launchers: start.sh for real (in a fresh venv that sees the installed packages), launch.py's options."""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_url(proc, timeout=300) -> str:
    deadline = time.time() + timeout
    output = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        output.append(line)
        match = re.search(r"running at (http://\S+)", line)
        if match:
            return match.group(1)
    raise AssertionError("no address printed:\n" + "".join(output[-30:]))


@pytest.mark.skipif(sys.platform == "win32", reason="start.sh is the Linux launcher")
def test_start_sh_creates_its_environment_installs_and_serves(tmp_path):
    venv = tmp_path / "venv"  # not there yet: start.sh creates it
    # The venv it creates sees this interpreter's packages (through a stand-in for python that adds
    # --system-site-packages), so start.sh's real `pip install -r requirements.txt` finds everything
    # satisfied instead of downloading it a second time.
    python = tmp_path / "python"
    python.write_text(f'#!/bin/bash\nif [ "$1 $2" = "-m venv" ]; then shift 2; exec "{sys.executable}" -m venv '
                      f'--system-site-packages "$@"; fi\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    port = _free_port()
    env = {**os.environ, "LORA_STUDIO_VENV": str(venv), "LORA_STUDIO_HOME": str(tmp_path / "home"),
           "PYTHON": str(python)}
    proc = subprocess.Popen(["bash", "start.sh", "--no-browser", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = _wait_for_url(proc)
        assert url == f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200 and b"LoRA Studio" in response.read()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert (venv / ".lora-studio-requirements").read_text().strip()  # the next start skips the install


@pytest.mark.skipif(sys.platform == "win32", reason="start.sh is the Linux launcher")
def test_an_environment_you_name_is_never_installed_into(tmp_path):
    venv = tmp_path / "mine"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)  # without the packages
    env = {**os.environ, "LORA_STUDIO_VENV": str(venv), "LORA_STUDIO_HOME": str(tmp_path / "home")}
    done = subprocess.run(["bash", "start.sh", "--no-browser"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and "lacks the app's packages" in done.stderr, done.stderr
    assert "installing" not in done.stdout + done.stderr
    assert not (venv / ".lora-studio-requirements").exists()


def test_launch_takes_the_next_free_port_and_refuses_bad_auth(tmp_path):
    sys.path.insert(0, str(ROOT))
    import launch

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        assert launch.free_port("127.0.0.1", port) > port
    with pytest.raises(SystemExit):
        launch.parse_args(["--listen", "--auth", "nopassword"])
    args = launch.parse_args(["--listen", "--auth", "me:secret", "--no-browser"])
    assert args.listen and args.auth == "me:secret" and not args.share


def test_demo_creates_the_tiny_model_and_dataset(tmp_path):
    from ui.demo import make_demo
    from ui.settings import AppSettings

    settings = AppSettings(tmp_path)
    settings.ensure()
    message = make_demo(settings)
    assert "wrote the tiny demo model" in message and "demo model that learns" in message
    assert (settings.models_dir / "tiny" / "model_index.json").is_file()
    assert len(list((settings.datasets_dir / "demo").glob("*.png"))) == 6
    # The demo model that learns, its concept (captioned) and the preset that teaches it.
    from core.base.models import load_models
    from ui import presets
    from ui.demo import DEMO_PRESET, DEMO_SETTINGS

    assert load_models(str(settings.models_dir / "demo-shapes")).family.name == "sd1"
    zorp = sorted((settings.datasets_dir / "zorp").glob("*.png"))
    assert len(zorp) == 12 and all("zorp" in p.with_suffix(".txt").read_text(encoding="utf-8") for p in zorp)
    assert DEMO_PRESET in presets.list_presets(settings.presets_dir)
    assert presets.load_preset(settings.presets_dir, DEMO_PRESET) == DEMO_SETTINGS
    assert make_demo(settings) == "the demo model and dataset are already there"
    # The button picks them: the model in the Train tab, the dataset, the preset (applied with one click).
    from ui.demo import demo_updates

    message, names, models, _, _, preset = demo_updates(settings)
    assert "Apply preset" in message and "--" not in message
    assert names["value"] == "zorp" and models["value"] == str(settings.models_dir / "demo-shapes")
    assert preset["value"] == DEMO_PRESET and DEMO_PRESET in preset["choices"]
    from ui.train_tab import apply_preset

    keys = ["dataset.resolution", "output.trigger_phrase", "train.max_train_steps", "dataset.validation_split"]
    updates = apply_preset(settings, keys, DEMO_PRESET, models["value"])
    assert [u["value"] for u in updates] == [64, "zorp", 200, 0.25]


def _older_python() -> str | None:
    """A Python older than 3.11 on this machine, if there is one (pyenv keeps several)."""
    import glob
    import shutil

    pyenv = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3.10")))
    for candidate in [shutil.which("python3.10"), *pyenv]:
        if candidate and subprocess.run([candidate, "--version"], capture_output=True).returncode == 0:
            return candidate
    return None


@pytest.mark.skipif(_older_python() is None, reason="no Python older than 3.11 on this machine")
def test_an_older_python_gets_a_clear_message(tmp_path):
    old = _older_python()
    done = subprocess.run([old, "launch.py", "--no-browser"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and "needs Python 3.11 or newer; this is 3.10" in done.stderr
    if sys.platform != "win32":
        env = {**os.environ, "LORA_STUDIO_VENV": str(tmp_path / "venv"), "PYTHON": old}
        done = subprocess.run(["bash", "start.sh", "--no-browser"], cwd=ROOT, env=env, capture_output=True,
                              text=True)
        assert done.returncode == 1 and "needs Python 3.11 or newer, and" in done.stderr
        assert not (tmp_path / "venv").exists()
