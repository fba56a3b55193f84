"""Nothing lost on a crash, no NaN ever saved: diverging runs, out of memory, a full disk, killed and re-attached
trainers, leftovers of cut-short saves, and run folders that failed before their first step."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core import config as config_mod
from core import fsutil
from core.events import Progress, RunStarted, read_events, read_typed
from core.training import loop, train
from core.training.run_folder import LOCK_FILE, RunPaths, latest_state, read_lock, run_status
from tests.conftest import EventLog, tiny_config, write_dataset

ROOT = Path(__file__).resolve().parents[1]
FAULTS = ROOT / "tests" / "faults.py"


def _finite_files(run_dir: Path) -> dict[str, bool]:
    """Every .safetensors under the run folder (LoRAs and resume states): are all its values finite?"""
    out = {}
    for path in sorted(run_dir.rglob("*.safetensors")):
        out[str(path.relative_to(run_dir))] = all(torch.isfinite(t).all() for t in load_file(path).values()
                                                  if t.is_floating_point())
    return out


def _cli(args: list[str], fault: tuple[str, int] | None = None, env: dict | None = None,
         timeout: float = 600) -> subprocess.CompletedProcess:
    prefix = [sys.executable, str(FAULTS), fault[0], str(fault[1])] if fault else [sys.executable, "-m", "core"]
    return subprocess.run([*prefix, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def _save(cfg, path: Path) -> Path:
    config_mod.save(cfg, path)
    return path


# ------------------------------------------------------------ a diverging run


def test_a_diverging_run_saves_nothing_non_finite(tiny_model, tmp_path):
    """fp32, learning rate 1.0, alpha 1e5 over rank 1: the weights blow up within a few steps."""
    data = write_dataset(tmp_path / "d", n=3)
    cfg = tiny_config(tiny_model, data, tmp_path / "out", name="boom",
                      **{"train.learning_rate": 1.0, "lora.alpha": 1e5, "lora.rank": 1, "train.optimizer": "adamw",
                         "train.max_grad_norm": 0.0, "train.max_train_steps": 30, "output.save_every_n_steps": 1,
                         "output.keep_states": 100, "sample.prompts": [], "dataset.validation_split": 0.0})
    with pytest.raises(train.TrainingError) as info:
        train.run(cfg, EventLog())
    message = str(info.value)
    assert info.value.kind == "diverged"
    assert "NaN or infinite" in message or "loss became" in message
    assert "training in fp32" in message and "instead of fp16" not in message
    assert "train.learning_rate = 1" in message and "lora.alpha = 100000" in message
    assert any(name in message for name in ("img1.png", "img2.png", "img 0 ça.png"))  # the last batch
    files = _finite_files(cfg.run_dir)
    assert files and all(files.values()), files
    state = latest_state(cfg.run_dir)
    if state is not None:  # the newest resume state is a good one
        assert all(torch.isfinite(t).all() for t in load_file(state / "lora_unet.safetensors").values())
        assert f"The last good LoRA is boom-step{int(state.name[5:]):06d}.safetensors" in message


def test_non_finite_weights_are_never_written_and_verify_lora_fails_on_them(tiny_model, tmp_path):
    from core.lora.lora_io import NonFiniteWeightsError, save_kohya_lora
    from core.lora.verify import verify

    data = write_dataset(tmp_path / "d", n=2)
    cfg = tiny_config(tiny_model, data, tmp_path / "out", **{"train.max_train_steps": 1, "sample.prompts": [],
                                                            "output.save_state": False})
    result = train.run(cfg, EventLog(), keep_models=True)
    lora = next(m for m in result.denoiser.modules() if hasattr(m, "lora_A"))
    with torch.no_grad():
        lora.lora_A["default"].weight[0, 0] = float("nan")
        lora.lora_B["default"].weight[0, :2] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match="3 LoRA weight value"):
        save_kohya_lora(tmp_path / "bad.safetensors", result.denoiser)
    assert not (tmp_path / "bad.safetensors").exists() and not list(tmp_path.glob(".bad*"))
    # A file written by something else: verify-lora counts the bad values and fails.
    tensors = load_file(result.lora_path)
    name = next(k for k in tensors if k.endswith("lora_down.weight"))
    tensors[name][0, :5] = float("nan")
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "nan.safetensors")
    check = verify(tmp_path / "nan.safetensors", str(tiny_model), image=False)
    assert not check.ok and any("5 weight value(s) are NaN or infinite" in p for p in check.problems)
    cli = _cli(["verify-lora", str(tmp_path / "nan.safetensors"), "--model", str(tiny_model), "--no-image"])
    assert cli.returncode == 1 and "FAILED" in cli.stdout and "NaN or infinite" in cli.stdout


# ------------------------------------------------------------ out of memory


def test_out_of_memory_stops_with_advice_and_keeps_the_last_step(tiny_model, tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "d", n=3)
    cfg = tiny_config(tiny_model, data, tmp_path / "out", name="oom",
                      **{"train.max_train_steps": 10, "train.batch_size": 2, "output.save_every_n_steps": 0,
                         "sample.every_n_steps": 0, "sample.prompts": []})
    calls = {"n": 0}
    real = loop.training_loss

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "training_loss", failing)
    with pytest.raises(train.TrainingError) as info:
        train.run(cfg, EventLog())
    message = str(info.value)
    assert info.value.kind == "out_of_memory"
    assert message.startswith("out of GPU memory at step 3 (batch 2, 64 px)")
    assert "train.gradient_checkpointing = true" in message and "train.batch_size = 1" in message
    assert "oom-step000003.safetensors" in message and "--resume" in message
    saved = cfg.run_dir / "oom-step000003.safetensors"
    assert _finite_files(cfg.run_dir)[saved.name]
    assert latest_state(cfg.run_dir).name == "step-00000003"
    # The user lowers the batch as advised and resumes from step 3.
    monkeypatch.setattr(loop, "training_loss", real)
    smaller = config_mod.from_dict({**config_mod.to_raw(cfg), "train": {**config_mod.to_raw(cfg)["train"],
                                                                          "batch_size": 1}})
    log = EventLog()
    result = train.run(smaller, log, resume=True)
    assert result.status == "completed" and result.step == 10
    assert log.of("run_started")[0].start_step == 3


def test_the_app_survives_a_run_that_runs_out_of_memory(tiny_model, tmp_path):
    from ui.runner import RunManager

    wrapper = tmp_path / "python-with-oom"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAULTS}" oom 2 "$@"\n')
    wrapper.chmod(0o755)
    outputs = tmp_path / "outputs"
    manager = RunManager(outputs, python=str(wrapper))
    data = write_dataset(tmp_path / "d", n=3)
    run = manager.start(tiny_config(tiny_model, data, outputs, name="oom-app",
                                    **{"train.max_train_steps": 8, "sample.prompts": []}))
    manager.wait(timeout=300)
    summary = run.poll()
    assert summary.error.startswith("out of GPU memory at step 2"), run.log_tail()
    assert "Traceback" not in run.log_tail()
    assert (outputs / "oom-app" / "oom-app-step000002.safetensors").is_file()
    status = run_status(outputs / "oom-app")
    assert status.state == "failed" and status.resumable_from == 2
    # The app is still up and free to start the next run (resuming after OOM is tested in-process above).
    assert manager.busy() is None and not run.running


# ------------------------------------------------------------ a full disk


def test_a_full_disk_ends_with_one_line_and_a_readable_run(tiny_model, tmp_path):
    data = write_dataset(tmp_path / "d", n=3)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # a warning --no-progress must still show
    cfg = tiny_config(tiny_model, data, tmp_path / "out", name="full",
                      **{"train.max_train_steps": 8, "output.save_every_n_steps": 1, "sample.every_n_steps": 0,
                         "sample.prompts": []})
    path = _save(cfg, tmp_path / "full.toml")
    done = _cli(["train", str(path), "--no-progress"], fault=("enospc", 3))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: the disk is full"), done.stderr
    assert "--resume" in errors[0]
    events, _ = read_events(cfg.run_dir / "events.jsonl")  # readable, whatever was cut
    assert events and all(isinstance(e, dict) for e in events)
    from ui.runner import summarize

    summary = summarize(cfg.run_dir)
    assert summary.step >= 3
    leftovers = [p.name for p in cfg.run_dir.rglob(".*")]
    assert leftovers == [], leftovers
    assert not (cfg.run_dir / LOCK_FILE).exists()
    assert load_file(cfg.run_dir / "full-step000003.safetensors")  # the last good save is whole
    # Space is freed: the run resumes from its last good state and completes.
    again = _cli(["train", str(path), "--resume", "--no-progress"])
    assert again.returncode == 0, again.stderr
    assert run_status(cfg.run_dir).state == "completed"
    # --no-progress hides the bar and the step lines, never a warning.
    assert "warning: skipped 1 unreadable image file(s): broken.png" in again.stderr
    assert "it/s" not in again.stderr


def test_appends_loop_on_short_writes_and_start_on_a_fresh_line(tmp_path, monkeypatch):
    log = tmp_path / "events.jsonl"
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))  # at most 7 bytes a call
    fsutil.append_line(log, json.dumps({"type": "message", "level": "info", "text": "x" * 50}))
    assert len(read_events(log)[0]) == 1
    # A full disk cuts a line in half: the writer raises, the next line starts fresh, the reader skips the half.
    calls = {"n": 0}

    def cut(fd, data):
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", cut)
    with pytest.raises(OSError, match="No space left"):
        fsutil.append_line(log, json.dumps({"type": "progress", "step": 1}))
    monkeypatch.setattr(os, "write", real_write)
    fsutil.append_line(log, json.dumps({"type": "message", "level": "info", "text": "after"}))
    events, offset = read_events(log)
    assert [e["type"] for e in events] == ["message", "message", "message"]
    assert "damaged line" in events[1]["text"] and events[2]["text"] == "after"
    assert offset == log.stat().st_size


@pytest.mark.slow  # the same end as the injected full disk above, on a real one (10 s)
@pytest.mark.skipif(os.geteuid() != 0 if hasattr(os, "geteuid") else True, reason="mounting a tmpfs needs root")
def test_a_real_full_disk(tiny_model, tmp_path):
    """A tiny tmpfs as the outputs folder: the disk fills at whatever point it fills; the end is always clean."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("this machine does not let the test mount a tmpfs")
    try:
        data = write_dataset(tmp_path / "d", n=3)
        cfg = tiny_config(tiny_model, data, mount, name="tmpfs",
                          **{"train.max_train_steps": 40, "output.save_every_n_steps": 1, "output.keep_states": 100,
                             "sample.every_n_steps": 0, "sample.prompts": [],
                             "dataset.cache_dir": str(tmp_path / "cache")})
        done = _cli(["train", str(_save(cfg, tmp_path / "c.toml")), "--no-progress"])
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("error: the disk is full"), done.stderr
        read_events(cfg.run_dir / "events.jsonl")
        assert [p.name for p in cfg.run_dir.rglob(".*")] == []
        good = sorted(cfg.run_dir.glob("tmpfs-step*.safetensors"))
        assert good and all(load_file(p) for p in good)
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# ------------------------------------------------------------ trainers, locks, leftovers


def _wait_for(condition, timeout: float = 300, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the trainer ended early: {proc.communicate()}")
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_a_trainer_outlives_the_app_is_found_again_killed_resumed_and_stopped(tiny_model, tmp_path):
    """One run through what happens to a trainer the app does not own: started from the command line (or by
    an app that has since closed), found by an app that starts now, refused a twin, killed, resumed from the
    app, found again by the next app start and stopped from there."""
    from ui.runner import RunManager, summarize

    outputs = tmp_path / "outputs"
    data = write_dataset(tmp_path / "d", n=3)
    cfg = tiny_config(tiny_model, data, outputs, name="outside",
                      **{"train.max_train_steps": 100000, "output.save_every_n_steps": 2, "sample.prompts": []})
    path = _save(cfg, tmp_path / "o.toml")
    log = tmp_path / "outside.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "core", "train", str(path)], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT), "LORA_STUDIO_LOG": str(log)})
    _wait_for(lambda: (latest_state(cfg.run_dir) or Path("step-00000000")).name >= "step-00000004", proc=proc)
    assert read_lock(cfg.run_dir).pid == proc.pid and run_status(cfg.run_dir).state == "running"
    # A second trainer on the live run is refused, even with overwrite, and names the process.
    twin = _cli(["train", str(path), "--set", "output.overwrite=true"])
    assert twin.returncode == 2 and f"being trained right now by process {proc.pid}" in twin.stderr
    # An app that starts now follows it (with its log) and refuses to start another run beside it.
    manager = RunManager(outputs)
    assert manager.active.run_dir == cfg.run_dir and manager.active.running and manager.active.lock.log == str(log)
    assert "step" in manager.active.log_tail()
    with pytest.raises(Exception, match="already training"):
        manager.start(tiny_config(tiny_model, data, outputs, name="second"))
    # Killed (no chance to clean up): interrupted, resumable from its last save.
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    status = run_status(cfg.run_dir)
    assert status.state == "interrupted" and status.resumable_from >= 4
    assert "resumable from step" in status.label()
    assert "ended without finishing" in manager.active.poll().error and not manager.active.running
    # Resumed from the app; the next app start (this one closed) finds that run and stops it cleanly.
    saved = status.resumable_from
    before = len(_starts(cfg.run_dir))
    resumed = manager.resume(cfg.run_dir, saved + 1000)
    _wait_for(lambda: _steps_since_last_start(cfg.run_dir, before) >= saved + 2, proc=resumed.process)
    restarted = RunManager(outputs)
    assert restarted.active.running and restarted.active.lock.pid == resumed.process.pid
    assert restarted.stop()
    assert resumed.process.wait(timeout=120) == 0
    restarted.wait(timeout=30)
    assert restarted.active.poll().finished == "stopped" and run_status(cfg.run_dir).state == "stopped"
    steps = [s for s, _ in summarize(cfg.run_dir).losses]
    assert saved + 1 in steps and saved + 2 in steps  # the curve carries on from the save
    assert not (cfg.run_dir / LOCK_FILE).exists()


def _starts(run_dir: Path) -> list[int]:
    events, _ = read_typed(RunPaths(run_dir).events)
    return [i for i, event in enumerate(events) if isinstance(event, RunStarted)]


def _steps_since_last_start(run_dir: Path, starts_before: int = 0) -> int:
    """The newest step reported by the run's latest start, once there have been more than ``starts_before``
    starts (not by the process before it: the killed one may have logged steps past its last save, and the
    resumed one may not have reported its start yet)."""
    events, _ = read_typed(RunPaths(run_dir).events)
    starts = [i for i, event in enumerate(events) if isinstance(event, RunStarted)]
    if len(starts) <= starts_before:
        return -1
    return max((event.step for event in events[starts[-1]:] if isinstance(event, Progress)), default=-1)


def test_leftovers_of_killed_saves_are_never_offered_and_are_cleaned(tiny_model, tmp_path):
    from ui.runner import RunManager
    from ui.settings import find_loras
    from ui.train_tab import run_files_text

    outputs = tmp_path / "outputs"
    data = write_dataset(tmp_path / "d", n=2)
    cfg = tiny_config(tiny_model, data, outputs, name="left", **{"train.max_train_steps": 2, "sample.prompts": []})
    train.run(cfg, EventLog())
    stale = [cfg.run_dir / ".left-step000004.abcd1234.tmp.safetensors", cfg.run_dir / "samples" / ".x.y.tmp.png"]
    for path in stale:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"")
    (cfg.run_dir / "state" / ".tmp-step-00000004").mkdir()
    assert all(not Path(p).name.startswith(".") for p in find_loras(outputs))
    assert ".left-step" not in run_files_text(cfg.run_dir)
    RunManager(outputs)  # the app starting
    assert not any(p.exists() for p in stale) and not (cfg.run_dir / "state" / ".tmp-step-00000004").exists()
    assert (cfg.run_dir / "left.safetensors").is_file()


def test_a_run_that_failed_before_its_first_step_does_not_block_its_name(tiny_model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = tiny_config(tiny_model, empty, tmp_path / "out", name="again", **{"sample.prompts": []})
    path = _save(cfg, tmp_path / "a.toml")
    first = _cli(["train", str(path), "--no-progress"])
    assert first.returncode == 2 and "no readable image" in first.stderr
    write_dataset(empty, n=2)
    second = _cli(["train", str(path), "--no-progress", "--set", "train.max_train_steps=2"])
    assert second.returncode == 0, second.stderr
    assert run_status(cfg.run_dir).state == "completed"
    # A run that did train is still protected.
    from core.config import ConfigError
    from core.training.run_folder import check_run_dir

    with pytest.raises(ConfigError, match="already holds a run"):
        check_run_dir(config_mod.load(path), resume=False)


@pytest.mark.parametrize("override,words", [
    ("output.name=" + "n" * 260, "output.name is 260 characters"),
    ("dataset.caption_extension=.txt/../../x", "dataset.caption_extension"),
    ("output.dir={file}", "is a file, not a folder"),
])
def test_config_mistakes_are_one_line_and_exit_2_before_anything_loads(tiny_model, tmp_path, override, words):
    (tmp_path / "a-file").write_text("x")
    cfg = tiny_config(tiny_model, write_dataset(tmp_path / "d", n=1), tmp_path / "out")
    done = _cli(["train", str(_save(cfg, tmp_path / "c.toml")), "--set",
                 override.format(file=tmp_path / "a-file")], timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config:") and words in lines[0], done.stderr
    assert not (tmp_path / "out").exists()
