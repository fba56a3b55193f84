"""Optimizers, learning-rate schedules and LoRA+: each one trains, and each changes what it must."""

import pytest
import torch
from conftest import EventLog, tiny_config, write_dataset

from core import config as config_mod
from core.training import train
from core.training.optimizers import averaged_weights, build_lr_scheduler, build_optimizer, param_groups

OPTIMIZERS = ["adamw8bit", "adamw", "prodigy", "adafactor", "lion8bit", "paged_adamw8bit", "schedulefree_adamw"]
CLASSES = {"adamw8bit": "AdamW8bit", "adamw": "AdamW", "prodigy": "Prodigy", "adafactor": "Adafactor",
           "lion8bit": "Lion8bit", "paged_adamw8bit": "PagedAdamW8bit", "schedulefree_adamw": "AdamWScheduleFree"}


def _config(**values):
    return config_mod.with_values(config_mod.TrainConfig(), values)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_is_built_and_takes_a_step(name):
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(4, 64)), torch.nn.Parameter(torch.zeros(64, 4))
    log = EventLog()
    optimizer = build_optimizer(_config(**{"train.optimizer": name, "train.learning_rate": 1e-3}),
                                [{"params": [a, b], "lr": 1e-3}], log)
    assert type(optimizer).__name__ == CLASSES[name]
    before = b.detach().clone()
    ((a.T @ b.T).sum() + (a ** 2).sum()).backward()
    optimizer.step()
    assert not torch.equal(b.detach(), before), "the step changed nothing"
    if name == "prodigy":  # a learning rate far below 1.0 is a mistake with Prodigy: said, not refused
        build_optimizer(_config(**{"train.optimizer": "prodigy"}), [{"params": [a], "lr": 1e-4}], log)
        assert any("Prodigy" in e.text for e in log.of("message"))


def test_schedule_free_weights_are_swapped_for_evaluation_and_back():
    import schedulefree

    p = torch.nn.Parameter(torch.ones(8))
    optimizer = schedulefree.AdamWScheduleFree([p], lr=0.1, warmup_steps=0)
    optimizer.train()
    for _ in range(5):
        (p ** 2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = p.detach().clone()
    with averaged_weights(optimizer):
        averaged = p.detach().clone()
    assert not torch.allclose(trained, averaged)  # the averaged point is another one
    torch.testing.assert_close(p.detach(), trained)  # and training goes on where it was
    plain = torch.optim.AdamW([p], lr=0.1)
    with averaged_weights(plain):  # other optimizers: nothing happens
        torch.testing.assert_close(p.detach(), trained)


def test_schedule_free_run_saves_its_averaged_weights(tiny_model, tmp_path):
    from safetensors.torch import load_file

    cfg = tiny_config(tiny_model, write_dataset(tmp_path / "d", n=3), tmp_path / "out", **{
        "train.optimizer": "schedulefree_adamw", "train.max_train_steps": 4, "train.learning_rate": 1e-2,
        "sample.prompts": [], "output.save_state": True, "output.save_every_n_steps": 0, "train.lr_warmup_steps": 1})
    log = EventLog()
    result = train.run(cfg, log, keep_models=True)
    assert result.status == "completed" and len(log.of("validation_loss")) == 3  # steps 0, 3 and 4
    saved = load_file(result.lora_path)
    layer = next(m for n, m in result.denoiser.named_modules() if n.endswith("attn1.to_q") and hasattr(m, "lora_B"))
    up = layer.lora_B["default"].weight.detach().to(torch.float16)
    assert any(torch.equal(t, up) for k, t in saved.items() if k.endswith("lora_up.weight"))
    assert result.lora_path.stat().st_size > 0 and (result.run_dir / "state").is_dir()


def _lrs(cfg, total=20):
    p = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([p], lr=cfg.train.learning_rate)
    scheduler = build_lr_scheduler(cfg, optimizer, total, 1)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_schedules_have_their_shapes():
    import math

    lr = 1.0
    restarts = _lrs(_config(**{"train.lr_scheduler": "cosine_with_restarts", "train.lr_scheduler_num_cycles": 2,
                               "train.learning_rate": lr}))
    assert restarts[0] == lr and restarts[9] < 0.1 and restarts[10] == pytest.approx(lr)  # back to the top
    poly = _lrs(_config(**{"train.lr_scheduler": "polynomial", "train.lr_scheduler_power": 2.0,
                           "train.learning_rate": lr}))
    assert poly[10] == pytest.approx((1 - 10 / 20) ** 2 * lr, abs=1e-6)
    wsd = _lrs(_config(**{"train.lr_scheduler": "warmup_stable_decay", "train.lr_decay_fraction": 0.25,
                          "train.learning_rate": lr, "train.lr_warmup_steps": 2}))
    assert wsd[1] == pytest.approx(0.5) and wsd[2:16] == [lr] * 14  # warmup, then stable until the last quarter
    assert wsd[16:] == pytest.approx([0.8, 0.6, 0.4, 0.2]) and not math.isclose(wsd[19], lr)  # then linear decay
    # schedule-free and Prodigy-like self-scheduled optimizers: no schedule on top
    flat = _lrs(_config(**{"train.lr_scheduler": "cosine", "train.optimizer": "schedulefree_adamw",
                           "train.learning_rate": lr}))
    assert flat == [lr] * 20


def test_loraplus_gives_the_up_matrices_their_own_learning_rate():
    a, b, c, d = (torch.nn.Parameter(torch.zeros(2, 2)) for _ in range(4))
    named = {id(a): "x.lora_A.default.weight", id(b): "x.lora_B.default.weight",
             id(c): "te.lora_A.default.weight", id(d): "te.lora_B.default.weight"}
    cfg = _config(**{"train.learning_rate": 1e-4, "train.loraplus_lr_ratio": 16.0,
                     "lora.text_encoder_learning_rate": 5e-5})
    groups = param_groups(cfg, [a, b], [c, d], named)
    lrs = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lrs[id(a)] == 1e-4 and lrs[id(b)] == pytest.approx(16e-4)
    assert lrs[id(c)] == 5e-5 and lrs[id(d)] == pytest.approx(16 * 5e-5)
    plain = param_groups(_config(**{"train.learning_rate": 1e-4}), [a, b], [], named)
    assert len(plain) == 1 and plain[0]["lr"] == 1e-4


def test_loraplus_run_and_its_metadata(tiny_model, tmp_path):
    from safetensors import safe_open

    cfg = tiny_config(tiny_model, write_dataset(tmp_path / "d", n=2), tmp_path / "out", **{
        "train.optimizer": "lion8bit", "train.learning_rate": 1e-5, "train.loraplus_lr_ratio": 4.0,
        "train.max_train_steps": 2, "sample.prompts": [], "output.save_state": False,
        "dataset.validation_split": 0.0, "train.lr_scheduler": "cosine_with_restarts"})
    result = train.run(cfg, EventLog())
    with safe_open(result.lora_path, "pt") as f:
        meta = f.metadata()
    assert meta["ss_optimizer"] == "lion8bit" and meta["ss_loraplus_lr_ratio"] == "4.0"
    assert meta["ss_lr_scheduler"] == "cosine_with_restarts" and meta["ss_lr_scheduler_num_cycles"] == "1"
    prodigy = tiny_config(tiny_model, tmp_path / "d", tmp_path / "out2", **{
        "train.optimizer": "prodigy", "train.learning_rate": 1.0, "train.max_train_steps": 1, "sample.prompts": [],
        "output.save_state": False, "dataset.validation_split": 0.0})
    with safe_open(train.run(prodigy, EventLog()).lora_path, "pt") as f:
        assert f.metadata()["ss_optimizer"].startswith("prodigy(d_coef=1.0,safeguard_warmup=True")


def test_prodigy_refuses_what_it_cannot_do(tiny_model, tmp_path):
    with pytest.raises(config_mod.ConfigError, match="loraplus_lr_ratio"):
        tiny_config(tiny_model, tmp_path, tmp_path, **{"train.optimizer": "prodigy", "train.loraplus_lr_ratio": 16.0})
    with pytest.raises(config_mod.ConfigError, match="text_encoder_learning_rate"):
        tiny_config(tiny_model, tmp_path, tmp_path, **{"train.optimizer": "prodigy", "lora.train_text_encoder": True,
                                                       "lora.text_encoder_learning_rate": 5e-5})


def test_the_planner_counts_each_optimizers_state():
    from core.base.architecture import reference
    from core.training.plan import estimate

    arch = reference("sd1")
    state = {name: estimate(_config(**{"train.optimizer": name, "model.family": "sd1"}), arch)
             .phases["training"]["optimizer"] for name in OPTIMIZERS}
    assert state["prodigy"] > state["adamw"] == state["schedulefree_adamw"] > state["adamw8bit"]
    assert state["adamw8bit"] == state["paged_adamw8bit"] > state["lion8bit"] > state["adafactor"] > 0


def test_epoch_saves_and_keeping_the_last_n_files_with_the_best_one(tiny_model, tmp_path):
    """Saves at epoch ends too; only the newest two intermediate files stay, plus the one with the best
    validation loss, which is never deleted."""
    from core.training.run_folder import RunPaths, prune_step_loras

    cfg = tiny_config(tiny_model, write_dataset(tmp_path / "d", n=4), tmp_path / "out", **{
        "train.max_train_steps": 9, "output.save_every_n_steps": 2, "output.save_every_n_epochs": 1,
        "output.keep_last_n": 2, "sample.every_n_steps": 2, "sample.prompts": [], "output.save_state": False,
        "dataset.validation_split": 0.25, "train.batch_size": 1, "dataset.repeats": 1})
    log = EventLog()
    result = train.run(cfg, log)
    paths = RunPaths.of(cfg)
    saved = sorted({int(e.path.rsplit("-step", 1)[1].split(".")[0]) for e in log.of("checkpoint")
                    if e.kind == "lora" and "-step" in e.path})
    assert 3 in saved and 6 in saved  # the ends of the 3-picture epochs, between the every-2-steps saves
    losses = {e.step: e.loss for e in log.of("validation_loss")}
    best = min((s for s in saved if s in losses), key=losses.get)
    kept = [int(p.stem.rsplit("-step", 1)[1]) for p in paths.step_loras()]
    assert set(kept) == set(saved[-2:]) | {best} and paths.final_lora.is_file()
    assert any("keep_last_n" in e.text for e in log.of("message"))
    assert result.status == "completed"
    # the rule itself: the best is protected, the newest kept, nothing happens with keep 0
    assert prune_step_loras(paths, 0, losses) == []
