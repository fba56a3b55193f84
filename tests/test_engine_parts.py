"""Smaller engine behaviours: optimizer fallback, model resolution, cache keys, CLI error paths."""

import sys

import pytest
import torch

from core import cli
from core.base.models import ModelError, component_fingerprint, load_models
from core.events import read_events
from core.training import train
from tests.conftest import EventLog, tiny_config, write_dataset


def test_adamw8bit_is_the_default_and_falls_back_with_a_notice(tiny_model, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_model, write_dataset(tmp_path / "d", n=1), tmp_path / "o")
    params = [torch.nn.Parameter(torch.zeros(64, 64))]
    log = EventLog()
    optimizer = train.build_optimizer(cfg, train.param_groups(cfg, params, [], {}), log)
    assert type(optimizer).__name__ == "AdamW8bit" and not log.events
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on a machine where it cannot be imported
    optimizer = train.build_optimizer(cfg, train.param_groups(cfg, params, [], {}), log)
    assert type(optimizer) is torch.optim.AdamW
    assert log.of("message")[0].level == "warning" and "torch AdamW" in log.of("message")[0].text


def test_text_encoder_gets_its_own_learning_rate(tiny_model, tmp_path):
    cfg = tiny_config(tiny_model, write_dataset(tmp_path / "d", n=1), tmp_path / "o",
                      **{"lora.train_text_encoder": True, "lora.text_encoder_learning_rate": 5e-5,
                         "train.optimizer": "adamw"})
    groups = train.param_groups(cfg, [torch.nn.Parameter(torch.zeros(2))], [torch.nn.Parameter(torch.zeros(2))], {})
    optimizer = train.build_optimizer(cfg, groups, EventLog())
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 5e-5]


def test_unknown_hub_model_offline_is_a_clear_model_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"could not get model 'nobody-here/no-such-model'.*models/"):
        load_models("nobody-here/no-such-model")


def test_model_fingerprint_changes_with_the_weights(tmp_path, tiny_model):
    from core.base.tiny import write_tiny_model

    other = write_tiny_model(tmp_path / "other", seed=1)
    assert component_fingerprint(tiny_model, "vae") == component_fingerprint(tiny_model, "vae")
    assert component_fingerprint(tiny_model, "vae") != component_fingerprint(other, "vae")
    assert component_fingerprint(tiny_model, "vae") != component_fingerprint(tiny_model, "text_encoder")
    weights = other / "vae" / "diffusion_pytorch_model.safetensors"
    before = component_fingerprint(other, "vae")
    weights.write_bytes(weights.read_bytes())  # replaced in place (new mtime)
    assert component_fingerprint(other, "vae") != before


def test_lora_weights_stay_fp32_under_bf16(tiny_model, tmp_path):
    cfg = tiny_config(tiny_model, write_dataset(tmp_path / "d", n=2), tmp_path / "o",
                      **{"train.mixed_precision": "bf16", "train.max_train_steps": 2, "sample.prompts": [],
                         "output.save_state": False, "output.save_every_n_steps": 0})
    result = train.run(cfg, EventLog(), keep_models=True)
    params = dict(result.denoiser.named_parameters())
    assert {p.dtype for n, p in params.items() if "lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in params.items() if "lora_" not in n} == {torch.bfloat16}


def test_out_of_memory_ends_with_one_actionable_line(tiny_model, tmp_path, monkeypatch, capsys):
    from core import config

    cfg = tiny_config(tiny_model, write_dataset(tmp_path / "d", n=2), tmp_path / "o", name="oom")
    path = tmp_path / "run.toml"
    config.save(cfg, path)

    def out_of_memory(config, emit, should_stop, resume, **kwargs):
        from core.events import Phase

        emit(Phase("loading model", 0, 0))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "run", out_of_memory)
    code = cli.main(["train", str(path), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    # One line that names what to change in this run's config (checkpointing and bf16 are off here).
    assert err[-1].startswith("error: out of GPU memory (batch 1, 64 px). Try, in this order: "
                              "train.gradient_checkpointing = true")
    assert "train.mixed_precision = 'bf16'" in err[-1]
    events, _ = read_events(cfg.run_dir / "events.jsonl")
    assert events[-1]["type"] == "error" and events[-1]["kind"] == "out_of_memory"


def test_unexpected_failure_writes_traceback_and_one_line(tiny_model, tmp_path, monkeypatch, capsys):
    from core import config

    cfg = tiny_config(tiny_model, write_dataset(tmp_path / "d", n=2), tmp_path / "o", name="boom")
    path = tmp_path / "run.toml"
    config.save(cfg, path)

    def boom(config, emit, should_stop, resume, **kwargs):
        from core.events import Phase

        config.run_dir.mkdir(parents=True, exist_ok=True)  # the command line has claimed it already (its lock)
        emit(Phase("loading model", 0, 0))
        raise RuntimeError("something broke")

    monkeypatch.setattr(train, "run", boom)
    assert cli.main(["train", str(path), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]  # (--no-progress still prints the phases)
    assert errors == err[-1:] and "RuntimeError: something broke" in err[-1] and "traceback.txt" in err[-1]
    assert "something broke" in (cfg.run_dir / "traceback.txt").read_text()


def test_native_resolution_from_configs(tiny_model, tmp_path):
    from core.base.models import native_resolution

    assert native_resolution(tiny_model) == 64  # sample_size 32 x VAE factor 2
    assert native_resolution(tmp_path) is None
