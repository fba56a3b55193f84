"""SD 1.x, SD 2.x and SDXL: detection, conditioning, and a few real training steps on each tiny family."""

import hashlib
import json

import pytest
import torch

from core.base.families import FAMILIES, FamilyError, detect_family
from core.base.models import load_models
from core.training import train
from tests.conftest import EventLog, tiny_config, write_dataset


def test_each_tiny_family_is_detected(tiny_model, tiny_sd2, tiny_sdxl, tmp_path):
    assert detect_family(tiny_model).name == "sd1"
    assert detect_family(tiny_sd2).name == "sd2"
    assert detect_family(tiny_sdxl).name == "sdxl"
    other = tmp_path / "flux"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(FamilyError, match="FluxPipeline"):
        detect_family(other)


def test_family_metadata_names():
    assert FAMILIES["sd1"].base_model_version("epsilon") == "sd_v1"
    assert FAMILIES["sd2"].base_model_version("v_prediction") == "sd_v2_v"
    assert FAMILIES["sd2"].base_model_version("epsilon") == "sd_v2"
    assert FAMILIES["sdxl"].base_model_version("epsilon") == "sdxl_base_v1-0"
    assert FAMILIES["sd2"].architecture("v_prediction", 768) == "stable-diffusion-v2-768-v/lora"
    assert FAMILIES["sdxl"].architecture("epsilon", 1024) == "stable-diffusion-xl-v1-base/lora"


def test_sdxl_conditioning_uses_both_encoders_and_pooled_text(tiny_sdxl):
    base = load_models(str(tiny_sdxl))
    assert base.family.name == "sdxl" and len(base.text.encoders) == 2
    hidden, pooled = base.text.encode(["a photo of sks", "a cat"])
    widths = [e.config.hidden_size for e in base.text.encoders]
    assert hidden.shape == (2, 77, sum(widths)) and pooled.shape == (2, base.text.encoders[1].config.projection_dim)
    # the penultimate layer of each encoder, side by side
    ids = base.text.tokenize(["a photo of sks"])
    first = base.text.encoders[0](ids[0], output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(base.text.encode(["a photo of sks"])[0][..., :widths[0]], first)
    # the size/crop ids reach the UNet: other ids, other prediction
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])

    def predict(time_ids):
        added = base.family.added_conditions(pooled[:1], torch.tensor([time_ids], dtype=torch.float32))
        return base.denoiser(latents, t, hidden[:1], added_cond_kwargs=added).sample

    assert not torch.allclose(predict([64, 64, 0, 0, 64, 64]), predict([512, 256, 0, 32, 64, 64]))


def test_sd2_trains_against_the_velocity(tiny_sd2):
    from core.training.objective import diffusion_loss

    base = load_models(str(tiny_sd2))
    assert base.family.name == "sd2" and base.prediction_type == "v_prediction"
    scheduler = base.noise_scheduler
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([300])
    hidden, _ = base.text.encode(["a photo of sks"])
    with torch.no_grad():
        loss = diffusion_loss(base.denoiser, scheduler, latents, hidden, noise, t)
        pred = base.denoiser(scheduler.add_noise(latents, noise, t), t, hidden).sample
    velocity = scheduler.get_velocity(latents, noise, t)
    torch.testing.assert_close(loss, ((pred - velocity) ** 2).mean(dim=(1, 2, 3)))
    assert not torch.allclose(loss, ((pred - noise) ** 2).mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_a_few_steps_train_validate_sample_and_save(family, tiny_sd2, tiny_sdxl, tmp_path):
    model = {"sd2": tiny_sd2, "sdxl": tiny_sdxl}[family]
    data = write_dataset(tmp_path / "d", n=4, size=(64, 96))
    cfg = tiny_config(model, data, tmp_path / "out", name=family, **{
        "train.max_train_steps": 3, "sample.every_n_steps": 0, "output.save_every_n_steps": 0,
        "output.save_state": False, "lora.train_text_encoder": True, "dataset.bucket_step": 16,
        "dataset.random_flip": True, "output.save_diffusers_format": True, "lora.alpha": 2.0,
        "output.trigger_phrase": "sks dog"})
    log = EventLog()
    result = train.run(cfg, log, keep_models=True)
    assert result.status == "completed" and result.step == 3
    assert any(f"{'SDXL' if family == 'sdxl' else 'SD 2.x'} model" in e.text for e in log.of("message"))
    assert len(log.of("validation_loss")) == 2 and len(log.of("sample")) == 2
    assert result.lora_path.is_file()
    checks = log.of("lora_verified")
    assert len(checks) == 2 and all(c.ok and c.matched == c.modules > 0 for c in checks)  # kohya and diffusers
    # every text encoder got a trained adapter
    trained = [n for n, p in result.text_encoder.named_parameters() if "lora_" in n]
    assert {n.split(".")[1] for n in trained} == ({"0", "1"} if family == "sdxl" else {"0"})

    # the exported file, through diffusers' own loader, gives the trained adapter's image back
    from safetensors import safe_open

    from core.base.sample import load_pipeline, pipeline_from_parts
    from core.lora.preview import apply_lora

    with safe_open(result.lora_path, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    prefixes = {k.split(".")[0].split("_text_model")[0] for k in keys if k.startswith("lora_te")}
    if family == "sdxl":
        assert prefixes == {"lora_te1", "lora_te2"}
        assert any(k.startswith("lora_unet_input_blocks_") for k in keys)
        assert not any(k.startswith("lora_unet_down_blocks_") for k in keys)
        assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sdxl_base_v1-0", "False")
    else:
        assert prefixes == {"lora_te"} and any(k.startswith("lora_unet_down_blocks_") for k in keys)
        assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sd_v2_v", "True")
        assert meta["modelspec.prediction_type"] == "v"
    required = ["ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
                "ss_v2", "ss_output_name", "ss_tag_frequency", "ss_resolution", "sshs_model_hash",
                "modelspec.architecture", "modelspec.title", "modelspec.resolution", "modelspec.prediction_type",
                "modelspec.trigger_phrase"]
    assert not [k for k in required if k not in meta]
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert meta["modelspec.trigger_phrase"] == "sks dog"
    data = result.lora_path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + header:]).hexdigest()
    base = load_models(str(model))
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="np")
    in_memory = pipeline_from_parts(model, base.vae, result.text_encoder, result.denoiser)
    trained_image = in_memory("a photo of sks", generator=torch.Generator().manual_seed(3), **kw).images[0]
    pipe = load_pipeline(str(model), device="cpu")
    base_image = pipe("a photo of sks", generator=torch.Generator().manual_seed(3), **kw).images[0]
    apply_lora(pipe, result.lora_path)
    loaded_image = pipe("a photo of sks", generator=torch.Generator().manual_seed(3), **kw).images[0]
    assert abs(trained_image - base_image).max() > 1e-4, "the LoRA does not change the image"
    torch.testing.assert_close(torch.tensor(loaded_image), torch.tensor(trained_image), atol=2e-3, rtol=0)
    # the optional diffusers/peft layout gives the same image (alpha 2 with rank 4 survives its metadata)
    diffusers_file = result.run_dir / f"{family}-diffusers" / "pytorch_lora_weights.safetensors"
    pipe = load_pipeline(str(model), device="cpu")
    apply_lora(pipe, diffusers_file)
    peft_image = pipe("a photo of sks", generator=torch.Generator().manual_seed(3), **kw).images[0]
    torch.testing.assert_close(torch.tensor(peft_image), torch.tensor(trained_image), atol=2e-3, rtol=0)


def test_verify_lora_on_each_family(tiny_sd2, tiny_sdxl, tmp_path):
    from core.lora.verify import verify

    for family, model in (("sd2", tiny_sd2), ("sdxl", tiny_sdxl)):
        data = write_dataset(tmp_path / family / "d", n=2)
        cfg = tiny_config(model, data, tmp_path / family / "out", **{
            "train.max_train_steps": 2, "sample.prompts": [], "output.save_state": False,
            "train.learning_rate": 1e-2, "dataset.validation_split": 0.0})
        lora = train.run(cfg, EventLog()).lora_path
        result = verify(lora, str(model), steps=2)
        assert result.ok and result.family == family and result.loads, result.summary()
        assert result.matched == result.modules > 0 and result.max_change >= 1.0


def test_verify_lora_warns_of_modules_sd_scripts_tools_cannot_place(tiny_model, tmp_path):
    """conv_in loads in ComfyUI and diffusers but has no slot in sd-scripts' network: a warning, not a failure."""
    from core.lora.verify import verify

    data = write_dataset(tmp_path / "d", n=2)
    cfg = tiny_config(tiny_model, data, tmp_path / "out", **{
        "train.max_train_steps": 2, "sample.prompts": [], "output.save_state": False, "train.learning_rate": 1e-2,
        "dataset.validation_split": 0.0, "lora.target_modules": ["to_q", "conv_in"]})
    log = EventLog()
    lora = train.run(cfg, log).lora_path
    result = verify(lora, str(tiny_model), steps=2)
    assert result.ok and len(result.warnings) == 1 and "lora_unet_conv_in" in result.warnings[0]
    assert "warning:" in result.summary()
    assert any("sd-scripts" in e.text for e in log.of("message") if e.level == "warning")
    plain = train.run(tiny_config(tiny_model, data, tmp_path / "out2", **{
        "train.max_train_steps": 1, "sample.prompts": [], "output.save_state": False,
        "dataset.validation_split": 0.0}), EventLog()).lora_path
    assert verify(plain, str(tiny_model), image=False).warnings == []
