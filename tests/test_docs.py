"""The README stays true: the test command CI runs, and every config key documented."""

import dataclasses
import re
from pathlib import Path

from core import config

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.DOTALL)
    test_command = next(b for b in blocks if "pytest" in b)
    assert test_command in (ROOT / ".ci" / "run").read_text()
    assert any("requirements.txt" in b and "launch.py" in b for b in blocks)


def test_every_config_key_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    cfg = config.TrainConfig()
    for section in config.SECTIONS:
        assert f"**[{section}]**" in readme
        for f in dataclasses.fields(getattr(cfg, section)):
            assert f"| `{f.name}` |" in readme, f"{section}.{f.name} is not documented"


def test_example_config_is_valid(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    cfg = config.load(ROOT / "examples" / "tiny.toml", check_paths=False)
    assert cfg.dataset.path == "examples/pictures"
    assert (ROOT / cfg.dataset.path).is_dir()
