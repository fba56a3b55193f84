"""train.ema: a moving average of the LoRA weights, kept in system RAM, validated, sampled and saved beside them."""

import math

import pytest
import torch
from conftest import EventLog, stop_then_resume, tiny_config, write_dataset
from safetensors.torch import load_file

from core import config as config_mod
from core.training import train
from core.training.ema import LoraEma


def test_the_average_lags_the_live_weights_by_the_decay():
    weight = torch.nn.Parameter(torch.zeros(3))
    ema = LoraEma([weight], decay=0.9, every=2)
    expected = torch.zeros(3)
    for step in range(1, 9):
        with torch.no_grad():
            weight += 1.0  # the "training" moves the weight by one each step
        ema.update(step)
        if step % 2 == 0:  # every second step: the average takes 1 - decay of the way, decay warming up
            n = step // 2 - 1  # updates before this one (the first copies the weights: decay 0)
            decay = min((1 + n) / (10 + n), 0.9) if n else 0.0
            expected = decay * expected + (1 - decay) * weight.detach()
    live = weight.detach().clone()
    assert ema.model.shadow_params[0].device.type == "cpu"
    with ema.weights():
        torch.testing.assert_close(weight.detach(), expected)
        assert (weight < live).all()  # it lags behind the weights that kept moving up
    torch.testing.assert_close(weight.detach(), live)  # the live weights come back


def test_a_run_with_ema_writes_and_checks_both_files(tiny_model, tmp_path):
    cfg = tiny_config(tiny_model, write_dataset(tmp_path / "d", n=4), tmp_path / "out", **{
        "train.ema": True, "train.ema_decay": 0.9, "train.max_train_steps": 4, "sample.every_n_steps": 2,
        "output.save_every_n_steps": 2, "output.save_state": True, "train.learning_rate": 1e-2})
    log = EventLog()
    result = train.run(cfg, log)
    assert result.status == "completed"
    run = result.run_dir
    final, ema = result.lora_path, run / "test-lora-ema.safetensors"
    assert ema.is_file() and (run / "test-lora-ema-step000002.safetensors").is_file()
    live, average = load_file(str(final)), load_file(str(ema))
    assert live.keys() == average.keys()
    assert any(not torch.equal(live[k], average[k]) for k in live if not k.endswith(".alpha"))
    kinds = [e.ema for e in log.of("validation_loss")]
    assert kinds.count(True) == kinds.count(False) > 0
    assert all(math.isfinite(e.loss) for e in log.of("validation_loss"))
    checked = {e.path for e in log.of("lora_verified")}
    assert str(ema) in checked and all(e.ok for e in log.of("lora_verified"))
    assert any(e.path.endswith("-ema.png") for e in log.of("sample"))
    assert not any("-ema" in p.name for p in run.glob("*-step*.safetensors") if "-ema-" not in p.name)


def test_ema_with_schedule_free_is_refused(tiny_model, tmp_path):
    with pytest.raises(config_mod.ConfigError, match="already averages"):
        tiny_config(tiny_model, tmp_path, tmp_path / "o", **{"train.ema": True,
                                                             "train.optimizer": "schedulefree_adamw"})


def test_the_average_resumes_where_it_was(tiny_model, tmp_path):

    data = write_dataset(tmp_path / "d", n=3)
    overrides = {"train.ema": True, "train.ema_decay": 0.9, "sample.prompts": [], "output.save_every_n_steps": 0,
                 "output.save_precision": "fp32", "train.max_train_steps": 4, "train.learning_rate": 1e-2,
                 "dataset.validation_split": 0.0}
    straight = train.run(tiny_config(tiny_model, data, tmp_path / "o", name="straight", **overrides), EventLog())
    cfg = tiny_config(tiny_model, data, tmp_path / "o", name="stopped", **overrides)
    stopped, resumed = stop_then_resume(cfg)
    assert stopped.status == "stopped" and resumed.status == "completed"
    a = load_file(cfg.run_dir / "stopped-ema.safetensors")
    b = load_file(straight.run_dir / "straight-ema.safetensors")
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
