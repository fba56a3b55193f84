"""Training on the tiny model, in-process: outputs, what changes, what is saved, determinism."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from core.config import ConfigError
from core.events import jsonl_writer, read_events
from core.training import objective, train
from core.training.run_folder import RunPaths
from tests.conftest import EventLog, tiny_config, write_dataset


def _emit_to(run_dir_log):
    """Events to memory and to events.jsonl, as the CLI does."""
    writer = {}

    def on_event(event):
        if "w" not in writer:
            writer["w"] = jsonl_writer(run_dir_log)
        writer["w"](event)

    return EventLog(on_event)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("trained")
    data = write_dataset(root / "pictures", n=6)
    cfg = tiny_config(tiny_model, data, root / "outputs", **{"output.save_precision": "fp32"})
    log = _emit_to(cfg.run_dir / "events.jsonl")
    result = train.run(cfg, log, keep_models=True)
    return cfg, log, result


def test_run_writes_every_output(trained):
    cfg, log, result = trained
    run_dir = cfg.run_dir
    assert result.status == "completed" and result.step == 6
    assert (run_dir / "config.toml").is_file()
    assert (run_dir / "test-lora.safetensors").is_file()
    assert (run_dir / "test-lora-step000003.safetensors").is_file()
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "step000000-00.png", "step000003-00.png", "step000006-00.png"]
    assert (run_dir / "state" / "step-00000006" / "lora_unet.safetensors").is_file()
    events, _ = read_events(run_dir / "events.jsonl")
    types = [e["type"] for e in events]
    for kind in ("phase", "run_started", "progress", "validation_loss", "sample", "checkpoint", "finished"):
        assert kind in types, kind
    progress = [e for e in events if e["type"] == "progress"]
    assert [e["step"] for e in progress] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(e["loss"]) and e["lr"] == pytest.approx(1e-3) and e["it_per_s"] > 0 for e in progress)
    assert progress[-1]["eta_s"] == 0
    assert [e["step"] for e in events if e["type"] == "validation_loss"] == [0, 3, 6]
    assert events[-1]["type"] == "finished" and events[-1]["status"] == "completed"
    # The resolved config was written before step 0, with absolute paths.
    saved = (run_dir / "config.toml").read_text()
    assert str(cfg.dataset.path) in saved


def test_only_lora_parameters_change(trained, tiny_model):
    from diffusers import UNet2DConditionModel

    _, _, result = trained
    original = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").state_dict()
    trained_params = dict(result.denoiser.named_parameters())
    lora = {n: p for n, p in trained_params.items() if "lora_" in n}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    assert any(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n), "lora_B never moved from zero"
    for name, param in trained_params.items():
        if "lora_" in name:
            continue
        base_name = name.replace(".base_layer", "")
        assert torch.equal(param.detach(), original[base_name]), f"base weight {name} changed"
        assert not param.requires_grad


def _image(pipe, seed=0):
    from core.base.sample import generate

    return np.asarray(generate(pipe, "a photo of sks", seed=seed, steps=2, width=64, height=64), dtype=np.float32)


def test_saved_file_reproduces_the_trained_adapter_and_changes_the_image(trained, tiny_model):
    from core.base.models import load_models
    from core.base.sample import load_pipeline, pipeline_from_parts
    from core.lora.preview import apply_lora

    cfg, _, result = trained
    base = load_models(str(tiny_model))
    in_memory = pipeline_from_parts(tiny_model, base.vae, base.text, result.denoiser)
    with_adapter = _image(in_memory)
    pipe = load_pipeline(str(tiny_model), device="cpu")
    without = _image(pipe)
    apply_lora(pipe, cfg.run_dir / "test-lora.safetensors", scale=1.0)
    from_file = _image(pipe)
    assert np.abs(with_adapter - without).max() > 0, "the LoRA does not change the image"
    np.testing.assert_allclose(from_file, with_adapter, atol=1.0)  # 8-bit images: at most 1 level apart
    assert np.abs(from_file - with_adapter).mean() < np.abs(from_file - without).mean()


def test_lora_file_has_kohya_keys_real_alpha_and_metadata(trained):
    cfg, _, result = trained
    path = cfg.run_dir / "test-lora.safetensors"
    tensors = load_file(path)
    alphas = {k: v for k, v in tensors.items() if k.endswith(".alpha")}
    assert alphas and all(k.startswith("lora_unet_") for k in tensors)
    assert all(float(v) == 8.0 for v in alphas.values()), "alpha must be the configured 8, not the rank 4"
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert any(k.endswith("to_out_0.lora_up.weight") for k in tensors)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 8.0
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_output_name"] == "test-lora" and meta["ss_steps"] == "6"
    assert meta["ss_resolution"] == "(64, 64)" and float(meta["ss_learning_rate"]) == 1e-3
    intermediate = safe_open(cfg.run_dir / "test-lora-step000003.safetensors", "pt").metadata()
    assert intermediate["ss_steps"] == "3"


def test_validation_loss_is_deterministic(trained, tiny_model, tmp_path):
    cfg, _, result = trained
    again = tiny_config(tiny_model, cfg.dataset.path, tmp_path, name="again", **{"output.save_precision": "fp32"})
    second = train.run(again, EventLog())
    assert second.validation_losses == result.validation_losses
    assert set(result.validation_losses) == {0, 3, 6}


def test_existing_run_is_not_overwritten_unless_asked(trained, tiny_model):
    cfg, _, _ = trained
    with pytest.raises(ConfigError, match="already holds a run"):
        train.run(cfg, EventLog())
    with pytest.raises(ConfigError, match="no saved state"):
        fresh = tiny_config(tiny_model, cfg.dataset.path, cfg.run_dir.parent, name="never-ran")
        train.run(fresh, EventLog(), resume=True)


def test_loss_decreases_with_fixed_noise_and_timestep(tiny_model, tmp_path):
    """The project's own objective, adapter and optimizer learn one example."""
    from accelerate import Accelerator

    cfg = tiny_config(tiny_model, write_dataset(tmp_path / "d", n=1), tmp_path / "o",
                      **{"train.learning_rate": 1e-2})
    base = train.load_base(cfg, Accelerator(cpu=True), EventLog())
    unet_params, te_params = train.add_lora(cfg, base)
    optimizer = train.build_optimizer(cfg, train.param_groups(cfg, unet_params, te_params, {}), EventLog())
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 32, 32, generator=gen)
    noise = torch.randn(1, 4, 32, 32, generator=gen)
    states = torch.randn(1, 77, 32, generator=gen)
    t = torch.tensor([500])
    base.denoiser.train()
    losses = []
    for _ in range(20):
        loss = objective.diffusion_loss(base.denoiser, base.noise_scheduler, latents, states, noise, t).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.97, losses


def test_stop_file_is_honoured_within_one_step_and_resume_matches_a_straight_run(tiny_model, tmp_path):
    data = write_dataset(tmp_path / "d", n=5)
    overrides = {"sample.prompts": [], "sample.at_start": False, "output.save_every_n_steps": 0,
                 "output.save_precision": "fp32", "train.max_train_steps": 6}
    straight = train.run(tiny_config(tiny_model, data, tmp_path / "o", name="straight", **overrides), EventLog())

    cfg = tiny_config(tiny_model, data, tmp_path / "o", name="stopped", **overrides)

    def touch_stop(event):
        if event.type == "progress" and event.step == 2:
            RunPaths.of(cfg).stop.touch()

    stopped = train.run(cfg, EventLog(touch_stop))
    assert stopped.status == "stopped" and stopped.step == 2
    assert (cfg.run_dir / "stopped.safetensors").is_file()
    assert (cfg.run_dir / "state" / "step-00000002").is_dir()

    changed = tiny_config(tiny_model, data, tmp_path / "o", name="stopped", **{**overrides, "lora.rank": 8})
    with pytest.raises(ConfigError, match="lora.rank was 4 in this run and is 8 now"):
        train.run(changed, EventLog(), resume=True)

    log = EventLog()
    resumed = train.run(cfg, log, resume=True)
    assert resumed.status == "completed" and resumed.step == 6
    assert [e.step for e in log.of("progress")] == [3, 4, 5, 6]
    a = load_file(cfg.run_dir / "stopped.safetensors")
    b = load_file(straight.lora_path)
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("while_training", [False, True], ids=["before-training", "while-training"])
def test_cache_is_reused_and_invalidated(tiny_model, tmp_path, while_training):
    from PIL import Image

    data = write_dataset(tmp_path / "d", n=3)
    quick = {"sample.prompts": [], "train.max_train_steps": 3, "output.save_state": False,
             "dataset.validation_split": 0.0, "dataset.cache_while_training": while_training}
    out = tmp_path / "o"
    cache = out / ".cache" / "latents"

    def entries():
        return sorted(p.name for p in cache.rglob("*.safetensors"))

    train.run(tiny_config(tiny_model, data, out, name="r1", **quick), EventLog())
    first = entries()
    assert len(first) == 3
    train.run(tiny_config(tiny_model, data, out, name="r2", **quick), EventLog())
    assert entries() == first  # nothing re-encoded
    Image.new("RGB", (80, 96), (1, 2, 3)).save(data / "img1.png")  # the user edits one image
    train.run(tiny_config(tiny_model, data, out, name="r3", **quick), EventLog())
    assert len(entries()) == 4
    train.run(tiny_config(tiny_model, data, out, name="r4", **{**quick, "dataset.resolution": 128}), EventLog())
    assert len(entries()) == 7


OPTIONS = {
    "text-encoder-lora": {"lora.train_text_encoder": True, "lora.text_encoder_learning_rate": 5e-4},
    "v-prediction-min-snr-offset": {"model.prediction_type": "v_prediction", "train.min_snr_gamma": 5.0,
                                    "train.noise_offset": 0.05},
    "no-latent-cache-grad-accum-batch2": {"dataset.cache_latents": False, "train.gradient_accumulation_steps": 2,
                                          "train.batch_size": 2},
    "adamw-cosine-warmup-checkpointing": {"train.optimizer": "adamw", "train.lr_scheduler": "cosine",
                                          "train.lr_warmup_steps": 2, "train.gradient_checkpointing": True},
    "bf16-epochs-repeats": {"train.mixed_precision": "bf16", "train.max_train_epochs": 1, "dataset.repeats": 2,
                            "lora.dropout": 0.1},
}


@pytest.mark.parametrize("name", OPTIONS)
def test_training_options(name, tiny_model, tmp_path):
    data = write_dataset(tmp_path / "d", n=4)
    cfg = tiny_config(tiny_model, data, tmp_path / "o", name=name,
                      **{"train.max_train_steps": 3, "sample.every_n_steps": 0, "output.save_every_n_steps": 0,
                         "output.save_state": False, **OPTIONS[name]})
    log = EventLog()
    result = train.run(cfg, log)
    assert result.status == "completed"
    losses = [e.loss for e in log.of("progress")]
    assert losses and all(np.isfinite(losses))
    tensors = load_file(result.lora_path)
    if cfg.lora.train_text_encoder:
        assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in tensors)
        assert "lora_te_" in json.dumps(list(tensors))
    if cfg.train.max_train_epochs:
        # 3 training images x 2 repeats / batch 1 = 6 steps for one epoch
        assert result.step == 6
    if cfg.train.lr_warmup_steps:
        lrs = [e.lr for e in log.of("progress")]
        assert lrs[0] < lrs[1]


def test_a_bf16_run_is_checked_in_bf16_and_the_check_still_sees_the_lora(tiny_model, tmp_path, monkeypatch):
    from core.lora import verify as verify_mod

    dtypes = []
    original = verify_mod.verify
    monkeypatch.setattr(verify_mod, "verify", lambda *a, **k: dtypes.append(k.get("dtype")) or original(*a, **k))
    log = EventLog()
    train.run(tiny_config(tiny_model, write_dataset(tmp_path / "d", n=2), tmp_path / "o", name="bf16",
                          **{"sample.prompts": [], "train.max_train_steps": 2, "train.mixed_precision": "bf16"}),
              log, final_check=True)
    check = log.of("lora_verified")[-1]
    assert dtypes == [torch.bfloat16] and check.step == -1 and check.ok and check.mean_change > 0


def test_the_final_check_is_part_of_the_run(tiny_model, tmp_path):
    """With final_check (what the command line asks), the engine lets the models go, checks the final file as
    others will load it, and only then reports the run finished; a file that changes nothing fails the run."""
    data = write_dataset(tmp_path / "d", n=2)
    overrides = {"sample.prompts": [], "train.max_train_steps": 2, "output.save_state": False,
                 "sample.steps": 2}
    log = EventLog()
    result = train.run(tiny_config(tiny_model, data, tmp_path / "o", name="good", **overrides), log,
                       final_check=True)
    assert result.denoiser is None and result.text_encoder is None and result.base is None
    assert [e.type for e in log.events[-2:]] == ["lora_verified", "finished"]
    assert log.events[-2].step == -1 and log.events[-2].ok and log.events[-2].loads
    # The check used the run's own model parts with the training adapter taken off: it sees what a fresh load
    # of the base model sees (with the adapter left on, the "before" image would already carry the LoRA).
    from core.lora.verify import verify

    fresh = verify(result.lora_path, str(tiny_model), prompt="a photo", seed=0, steps=2, size=64)
    assert log.events[-2].mean_change == pytest.approx(fresh.mean_change, rel=1e-4) and fresh.mean_change > 0
    # A learning rate so small that the LoRA stays zero: the run fails its check, after "finished".
    log = EventLog()
    with pytest.raises(train.TrainingError, match="failed verification: .*does not change the image") as info:
        train.run(tiny_config(tiny_model, data, tmp_path / "o", name="nothing",
                              **{**overrides, "train.learning_rate": 1e-12}), log, final_check=True)
    assert info.value.kind == "check"
    assert [e.type for e in log.events[-2:]] == ["lora_verified", "finished"] and not log.events[-2].ok
