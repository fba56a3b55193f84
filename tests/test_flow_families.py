"""SD 3.5 and FLUX.1: the flow-matching transformer families, trained, sampled, exported and checked offline.

Each runs on a tiny random-weight model with the real structure (tests/conftest.py), through the same engine,
files and checks as the SD families.
"""

import math

import pytest
import torch
from conftest import EventLog, tiny_config, write_dataset

from core.base.families import detect_family
from core.training import train

FAMILIES = ["sd3", "flux", "zimage", "flux2"]
LABELS = {"sd3": "SD 3.5", "flux": "FLUX.1", "zimage": "Z-Image", "flux2": "FLUX.2 [klein]"}
# A fused layer of each family's file (sd-scripts' names of the original model) and its number of parts.
FUSED = {"sd3": ("lora_unet_joint_blocks_0_x_block_attn_qkv", 3), "flux": ("lora_unet_double_blocks_0_img_attn_qkv", 3),
         "zimage": ("lora_unet_layers_0_attention_qkv", 3), "flux2": ("lora_unet_double_blocks_0_img_attn_qkv", 3)}
METADATA = {"sd3": ("5-medium", "stable-diffusion-3-5-medium/lora"), "flux": ("flux1", "flux-1-dev/lora"),
            "zimage": ("z_image", "z-image-turbo/lora"), "flux2": ("flux2_klein", "flux-2-klein-4b-base/lora")}


@pytest.fixture(scope="module")
def flow_models(tiny_sd3, tiny_flux, tiny_zimage, tiny_flux2):
    return {"sd3": tiny_sd3, "flux": tiny_flux, "zimage": tiny_zimage, "flux2": tiny_flux2}


def test_detected_from_the_model_files(tiny_sd3, tiny_flux, tiny_zimage, tiny_flux2, tmp_path):
    from core.base.models import load_models, native_resolution
    from core.base.tiny import write_tiny_model

    assert detect_family(tiny_sd3).name == "sd3" and detect_family(tiny_flux).name == "flux"
    assert load_models(str(tiny_sd3)).variant == "3.5-medium"  # MMDiT-X: the first block's second attention
    assert load_models(str(tiny_flux)).variant == "dev"  # a guidance embedding
    schnell = write_tiny_model(tmp_path / "schnell", family="flux-schnell")
    base = load_models(str(schnell))
    assert base.variant == "schnell" and base.text.lengths == (77, 256)  # schnell was distilled with 256 tokens
    assert load_models(str(tiny_flux)).text.lengths == (77, 512)
    assert load_models(str(tiny_sd3)).text.lengths == (77, 77, 256)
    assert native_resolution(tiny_flux) == 64
    zimage, klein = load_models(str(tiny_zimage)), load_models(str(tiny_flux2))
    assert (zimage.family.name, zimage.variant, zimage.text.lengths) == ("zimage", "turbo", (512,))
    assert (klein.family.name, klein.variant, klein.text.lengths) == ("flux2", "4b-base", (512,))
    assert type(zimage.text.encoders[0]).__name__ == "Qwen3Model"  # model_index's class, not the causal LM


def test_flow_target_and_sampling_against_hand_computed_values(tiny_flux):
    from core.base.models import load_models
    from core.config import from_dict
    from core.training.objective import flow_loss, flow_shift, sample_levels, shifted

    # the shift: sigma' = s*sigma / (1 + (s-1)*sigma)
    assert float(shifted(torch.tensor(0.5), 3.0)) == pytest.approx(0.75)
    assert float(shifted(torch.tensor(0.25), 1.0)) == pytest.approx(0.25)
    cfg = from_dict({}, check_paths=False)
    base = load_models(str(tiny_flux))
    # FLUX's dynamic shift: mu = 0.5 + 0.65 * (tokens - 256) / 3840, shift = e^mu; 1024 tokens at 512 px
    at_512 = flow_shift(cfg, base.noise_scheduler, (1, 16, 64, 64), base.family)
    assert at_512 == pytest.approx(math.exp(0.5 + 0.65 * 768 / 3840))
    assert flow_shift(cfg, base.noise_scheduler, (1, 16, 128, 128), base.family) == pytest.approx(math.exp(1.15))
    fixed = from_dict({"train": {"flow_shift": 2.0}}, check_paths=False)
    assert flow_shift(fixed, base.noise_scheduler, (1, 16, 8, 8), base.family) == 2.0
    # logit-normal: sigmoid of a normal draw with the configured mean and std
    cfg = from_dict({"train": {"timestep_sampling": "logit_normal", "logit_mean": 0.5, "logit_std": 2.0}},
                   check_paths=False)
    drawn = sample_levels(cfg, base.family, 5, torch.Generator().manual_seed(1), "cpu")
    expected = torch.sigmoid(torch.normal(0.5, 2.0, (5,), generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(drawn, expected)
    uniform = sample_levels(from_dict({"train": {"timestep_sampling": "uniform"}}, check_paths=False), base.family, 5,
                            torch.Generator().manual_seed(1), "cpu")
    torch.testing.assert_close(uniform, torch.rand(5, generator=torch.Generator().manual_seed(1)))
    # the loss: the transformer's velocity at (1 - sigma) x + sigma n against n - x
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 16, 8, 8, generator=gen), torch.randn(2, 16, 8, 8, generator=gen)
    hidden, pooled = base.text.encode(["a photo", "a dog"])
    cond = {"hidden": hidden, "pooled": pooled, "guidance": 1.0}
    sigmas = torch.tensor([0.25, 0.75])
    loss = flow_loss(base.denoiser, base.family, latents, noise, sigmas, cond)
    s = sigmas.view(-1, 1, 1, 1)
    pred = base.family.predict(base.denoiser, (1 - s) * latents + s * noise, sigmas, cond)
    torch.testing.assert_close(loss, ((pred - (noise - latents)) ** 2).mean(dim=(1, 2, 3)))
    assert not torch.allclose(loss, ((pred - noise) ** 2).mean(dim=(1, 2, 3)))  # not the noise target
    weighted = flow_loss(base.denoiser, base.family, latents, noise, sigmas, cond, "sigma_sqrt")
    torch.testing.assert_close(weighted, loss * sigmas ** -2)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_few_steps_train_validate_sample_export_and_reload(family, flow_models, tmp_path):
    from safetensors import safe_open

    from core.base.models import load_models
    from core.base.sample import load_pipeline, pipeline_from_parts
    from core.lora.preview import apply_lora

    model = flow_models[family]
    data = write_dataset(tmp_path / "d", n=4, size=(64, 96))
    cfg = tiny_config(model, data, tmp_path / "out", name=family, **{
        "train.max_train_steps": 3, "sample.every_n_steps": 0, "output.save_every_n_steps": 0,
        "output.save_state": False, "dataset.bucket_step": 16, "lora.alpha": 2.0,
        "output.save_diffusers_format": True, "sample.guidance_scale": 3.5})
    before = {n: p.detach().clone() for n, p in load_models(str(model)).denoiser.named_parameters()}
    log = EventLog()
    result = train.run(cfg, log, keep_models=True)
    assert result.status == "completed" and result.step == 3
    assert any(f"{LABELS[family]} model (flow)" in e.text for e in log.of("message"))
    assert len(log.of("validation_loss")) == 2 and len(log.of("sample")) == 2
    checks = log.of("lora_verified")
    assert len(checks) == 2 and all(c.ok and c.matched == c.modules > 0 for c in checks), checks
    # only LoRA weights changed
    after = dict(result.denoiser.named_parameters())
    changed = {n.replace(".base_layer", "") for n, p in after.items()
               if "lora_" not in n and not torch.equal(p.detach(), before[n.replace(".base_layer", "")])}
    assert not changed
    assert any("lora_B" in n and p.detach().abs().sum() > 0 for n, p in after.items())

    with safe_open(result.lora_path, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    if family == "flux":
        assert any(k.startswith("lora_unet_single_blocks_1_linear1.") for k in keys)
        assert meta["ss_network_module"] == "networks.lora_flux"
    if family == "sd3":
        assert any(k.startswith("lora_unet_joint_blocks_0_x_block_attn2_qkv.") for k in keys)
    if family == "flux2":
        assert any(k.startswith("lora_unet_single_blocks_1_linear1.") for k in keys)
    if family == "zimage":
        assert any(k.startswith("lora_unet_noise_refiner_0_attention_qkv.") for k in keys)
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == METADATA[family]
    assert not any("transformer_blocks" in k or "to_q" in k for k in keys)  # the original model's names only
    assert "modelspec.prediction_type" not in meta and meta["ss_network_dim"] == "4"
    # ComfyUI's (and Forge's) rule for every model: lora_unet_ + a weight name of the original single file with
    # dots as underscores; every module of the file is one, with the shapes of that weight
    from core.base.flow_checkpoint import original_state_dict

    original = original_state_dict(load_models(str(model)).denoiser, family)
    weights = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_"): v.shape
               for k, v in original.items() if k.endswith(".weight")}
    with safe_open(result.lora_path, "pt") as f:
        for name in {k.rsplit(".", 2)[0] for k in keys if k.endswith(".lora_down.weight")}:
            assert name in weights, name
            down, up = f.get_tensor(name + ".lora_down.weight"), f.get_tensor(name + ".lora_up.weight")
            assert (up.shape[0], down.shape[1]) == tuple(weights[name]), name
    # a fused q/k/v layer: rank 3 x 4, alpha 3 x 2 (alpha / rank stays the trained 0.5)
    qkv, parts = FUSED[family]
    with safe_open(result.lora_path, "pt") as f:
        assert f.get_tensor(qkv + ".lora_down.weight").shape[0] == 4 * parts
        assert float(f.get_tensor(qkv + ".alpha")) == 2.0 * parts

    # the file, loaded into the family's pipeline, gives the trained adapter's picture back
    base = load_models(str(model))
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="np", max_sequence_length=32,
              guidance_scale={"zimage": 0.0, "flux2": 1.0}.get(family, 3.5))
    in_memory = pipeline_from_parts(model, base.vae, base.text, result.denoiser)
    trained_image = in_memory(prompt="a photo of sks", generator=torch.Generator().manual_seed(3), **kw).images[0]
    pipe = load_pipeline(str(model), device="cpu")
    base_image = pipe(prompt="a photo of sks", generator=torch.Generator().manual_seed(3), **kw).images[0]
    apply_lora(pipe, result.lora_path)
    loaded_image = pipe(prompt="a photo of sks", generator=torch.Generator().manual_seed(3), **kw).images[0]
    assert abs(trained_image - base_image).max() > 1e-4, "the LoRA does not change the image"
    torch.testing.assert_close(torch.tensor(loaded_image), torch.tensor(trained_image), atol=2e-3, rtol=0)
    # the optional diffusers/peft layout, read by diffusers' own loader, too
    pipe = load_pipeline(str(model), device="cpu")
    pipe.load_lora_weights(str(result.run_dir / f"{family}-diffusers"), weight_name="pytorch_lora_weights.safetensors")
    peft_image = pipe(prompt="a photo of sks", generator=torch.Generator().manual_seed(3), **kw).images[0]
    torch.testing.assert_close(torch.tensor(peft_image), torch.tensor(trained_image), atol=2e-3, rtol=0)


def test_nf4_base_trains_on_cpu_and_its_lora_loads_on_the_full_model(tiny_flux, tmp_path):
    import bitsandbytes as bnb

    from core.lora.verify import verify

    data = write_dataset(tmp_path / "d", n=2)
    cfg = tiny_config(tiny_flux, data, tmp_path / "out", **{
        "model.quantize": "nf4", "train.mixed_precision": "bf16", "train.max_train_steps": 2,
        "sample.prompts": [], "output.save_state": False, "dataset.validation_split": 0.0,
        "train.learning_rate": 1e-2})
    log = EventLog()
    result = train.run(cfg, log, keep_models=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in result.denoiser.modules())
    t5 = result.text_encoder.encoders[1]  # stored like the base: it only encodes the captions
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in t5.modules())
    assert any("T5EncoderModel stored in nf4" in e.text for e in log.of("message"))
    check = verify(result.lora_path, str(tiny_flux), steps=2)  # the unquantised model
    assert check.ok and check.loads and check.max_change >= 1.0, check.summary()


def test_verify_lora_refuses_a_file_of_another_family(tiny_sd3, tiny_flux, tiny_model, tmp_path):
    from core.lora.verify import verify

    data = write_dataset(tmp_path / "d", n=2)
    cfg = tiny_config(tiny_flux, data, tmp_path / "out", **{
        "train.max_train_steps": 1, "sample.prompts": [], "output.save_state": False,
        "dataset.validation_split": 0.0})
    lora = train.run(cfg, EventLog()).lora_path
    for other in (tiny_sd3, tiny_model):
        result = verify(lora, str(other), steps=1)
        assert not result.ok and result.matched == 0, result.summary()


def test_fused_layers_read_back_exactly_by_diffusers_at_flux_widths():
    """At FLUX.1's real widths diffusers' own sd-scripts reader splits the block-diagonal fused layers back into
    q, k, v (and the single blocks' MLP input) with each part's trained update; built on the meta device."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from core.lora.fused_layout import export

    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=1, num_single_layers=1)  # 3072 wide, 24 heads of 128
    gen = torch.Generator().manual_seed(0)
    rank = 4
    parts = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
             "transformer_blocks.0.attn.to_out.0", "single_transformer_blocks.0.attn.to_q",
             "single_transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.attn.to_v",
             "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out"]
    layers = {}
    for path in parts:
        base = model.get_submodule(path)
        layers[path] = (torch.randn(rank, base.in_features, generator=gen) / 50,
                        torch.randn(base.out_features, rank, generator=gen) / 50, 2.0)
    tensors = export("flux", layers, model, torch.float32)
    assert set(k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in tensors) == {
        "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_img_attn_proj",
        "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2"}
    converted = _convert_kohya_flux_lora_to_diffusers(dict(tensors))
    for path, (down, up, alpha) in layers.items():
        a, b = converted[f"transformer.{path}.lora_A.weight"], converted[f"transformer.{path}.lora_B.weight"]
        assert a.shape[0] == rank  # split back to the part's own rank
        torch.testing.assert_close(b @ a, up @ down * (alpha / rank), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_samples_from_cached_prompts_match_the_text_encoders(family, flow_models):
    """During training the flow families' sample prompts come from the text cache (T5 stays off the card);
    the picture is the one the pipeline makes from the prompt itself."""
    import numpy as np

    from core.base.models import load_models
    from core.base.sample import generate, load_pipeline

    model = flow_models[family]
    pipe = load_pipeline(str(model), device="cpu")
    base = load_models(str(model))

    def cached(caption):  # as the text cache holds it: each caption's own tokens for Z-Image
        hidden, second = base.text.encode([caption])
        if base.family.variable_text:
            return {"hidden": hidden[:, : int(second[0])]}
        return {"hidden": hidden, "pooled": second} if second is not None else {"hidden": hidden}

    negative = "blurry" if base.family.negative_prompt else ""  # FLUX.2's pipeline guides against "" always
    embeds = base.family.pipeline_embeds(cached("a photo of sks"), cached(negative))
    kw = dict(seed=2, steps=2, width=64, height=64, guidance_scale=4.0, negative_prompt="blurry")
    from_text = np.asarray(generate(pipe, "a photo of sks", **kw), dtype=float)
    from_cache = np.asarray(generate(pipe, "a photo of sks", embeds=embeds, **kw), dtype=float)
    assert np.abs(from_text - from_cache).max() <= 1.0


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_text_encoder_lora_trains_the_clip_encoders_only(family, flow_models, tmp_path):
    """lora.train_text_encoder on SD 3.5 / FLUX trains CLIP (both of SD 3.5's), never T5; the file's
    lora_te keys load back into the pipeline and give the trained picture."""
    from safetensors import safe_open

    from core.base.models import load_models
    from core.base.sample import load_pipeline, pipeline_from_parts
    from core.lora.preview import apply_lora

    model = flow_models[family]
    cfg = tiny_config(model, write_dataset(tmp_path / "d", n=2), tmp_path / "out", **{
        "train.max_train_steps": 2, "sample.prompts": [], "output.save_state": False,
        "dataset.validation_split": 0.0, "lora.train_text_encoder": True, "train.learning_rate": 1e-2})
    result = train.run(cfg, EventLog(), keep_models=True)
    t5 = result.text_encoder.encoders[-1]
    assert not any("lora_" in name for name, _ in t5.named_parameters())
    with safe_open(result.lora_path, "pt") as f:
        prefixes = {k.split("_text_model")[0] for k in f.keys() if k.startswith("lora_te")}
    assert prefixes == ({"lora_te1", "lora_te2"} if family == "sd3" else {"lora_te1"})
    base = load_models(str(model))
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="np", max_sequence_length=32,
              guidance_scale=3.5)
    trained = pipeline_from_parts(model, base.vae, result.text_encoder, result.denoiser)
    expected = trained(prompt="a photo of sks", generator=torch.Generator().manual_seed(3), **kw).images[0]
    pipe = load_pipeline(str(model), device="cpu")
    apply_lora(pipe, result.lora_path)
    got = pipe(prompt="a photo of sks", generator=torch.Generator().manual_seed(3), **kw).images[0]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=2e-3, rtol=0)


def test_the_app_trains_a_flux_lora_and_previews_it(tiny_flux, tmp_path):
    """The whole app path for a flow family: the subprocess run, its check, the Prompt tab's model defaults,
    base vs LoRA and the strengths grid through the Previewer."""
    import shutil

    import numpy as np

    from core.lora.preview import Previewer
    from ui import prompt_tab
    from ui.runner import RunManager
    from ui.settings import AppSettings, find_loras, model_choices

    settings = AppSettings(tmp_path / "home")
    settings.ensure()

    model = settings.models_dir / "flux-tiny"
    shutil.copytree(tiny_flux, model)
    assert model_choices(settings.models_dir) == [("flux-tiny — FLUX.1", str(model))]
    manager = RunManager(settings.outputs_dir)
    cfg = tiny_config(model, write_dataset(tmp_path / "d", n=3), settings.outputs_dir, name="flux-run",
                      **{"train.max_train_steps": 2, "sample.every_n_steps": 0, "output.save_state": False,
                         "train.learning_rate": 1e-2, "sample.guidance_scale": 3.5})
    run = manager.start(cfg)
    assert manager.wait(timeout=600) == 0, run.log_tail()
    summary = run.poll()
    assert summary.finished == "completed" and summary.error == ""
    assert summary.check.ok and summary.check.loads and len(summary.samples) == 2
    lora = find_loras(settings.outputs_dir)[0]
    # picking the model sets FLUX.1-dev's own sampling
    width, height, steps, guidance = prompt_tab.model_size(str(model))
    assert (width["value"], steps["value"], guidance["value"]) == (64, 28, 3.5)
    previewer = Previewer(device="cpu")
    kw = dict(seed=1, steps=2, width=64, height=64, guidance_scale=3.5)
    base = np.asarray(previewer.generate(str(model), "a photo of sks", **kw), dtype=np.int16)
    with_lora = np.asarray(previewer.generate(str(model), "a photo of sks", lora=lora, **kw), dtype=np.int16)
    assert np.abs(with_lora - base).max() > 0
    grid = previewer.grid(str(model), "a photo of sks", [lora], [0.0, 1.0], **kw)
    assert grid.size == (230 + 2 * (256 + 16), 8 + 26 + 256 + 8) and previewer.loads == 1
