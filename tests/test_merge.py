"""Merge a LoRA into its base model, save one single file, load it back with this app's own loader."""

import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

from core.base.models import resolve_model_path
from core.base.sample import generate, load_pipeline
from core.lora.merge import merge
from core.lora.preview import apply_lora
from core.training import train
from tests.conftest import EventLog, tiny_config, write_dataset
from tests.test_cli import core_cmd


def _lora(model, tmp_path):
    data = write_dataset(tmp_path / "d", n=2)
    cfg = tiny_config(model, data, tmp_path / "out", **{
        "train.max_train_steps": 3, "sample.prompts": [], "output.save_state": False, "train.learning_rate": 1e-2,
        "dataset.validation_split": 0.0, "lora.train_text_encoder": True, "output.save_precision": "fp32"})
    return train.run(cfg, EventLog()).lora_path


def _image(pipe):
    return np.asarray(generate(pipe, "a photo of sks", seed=4, steps=2, width=64, height=64), dtype=np.float64)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_merged_single_file_gives_base_plus_lora(family, tiny_model, tiny_sd2, tiny_sdxl, tmp_path):
    model = {"sd1": tiny_model, "sd2": tiny_sd2, "sdxl": tiny_sdxl}[family]
    lora = _lora(model, tmp_path)
    models = tmp_path / "models"
    shutil.copytree(model, models / "configs" / family)  # the family's configs, found offline
    merged = merge(str(model), lora, 0.7, models / "merged.safetensors", precision="fp32")
    with safe_open(merged, "pt") as f:
        meta = f.metadata()
    assert meta["lora_studio.merged_scale"] == "0.7" and meta["lora_studio.merged_lora"] == lora.name

    expected_pipe = load_pipeline(str(model), device="cpu")
    base = _image(expected_pipe)
    apply_lora(expected_pipe, lora, 0.7)
    expected = _image(expected_pipe)
    converted = resolve_model_path(str(merged))  # this app's single-file loader
    assert converted.parent.name == ".diffusers" and (converted / "model_index.json").is_file()
    got = _image(load_pipeline(str(converted), device="cpu"))
    assert np.abs(expected - base).max() >= 1.0, "the LoRA does not change the image"
    assert np.abs(got - expected).max() <= 1.0  # fused weights: the same picture, to one level in 255
    assert resolve_model_path(str(merged)) == converted  # converted once, then reused


def test_merge_command_fp16_and_errors(tiny_model, tmp_path, capsys):
    lora = _lora(tiny_model, tmp_path)
    out16 = core_cmd("merge", "--model", tiny_model, "--lora", lora, "--scale", "1",
                     "--out", tmp_path / "m16.safetensors")
    assert out16.returncode == 0, out16.stderr
    merge(str(tiny_model), lora, 1.0, tmp_path / "m32.safetensors", precision="fp32")
    size16, size32 = ((tmp_path / n).stat().st_size for n in ("m16.safetensors", "m32.safetensors"))
    assert 0.45 < size16 / size32 < 0.55
    with safe_open(tmp_path / "m16.safetensors", "pt") as f:
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
    # the command's refusals (in this process: the same code the subprocess runs, without its start-up)
    from core.cli import main

    missing = main(["merge", "--model", str(tiny_model), "--lora", str(tmp_path / "none.safetensors"), "--out",
                    str(tmp_path / "x.safetensors")])
    assert missing == 2 and "does not exist" in capsys.readouterr().err
    wrong = main(["merge", "--model", str(tiny_model), "--lora", str(lora), "--out", str(tmp_path / "x.ckpt")])
    assert wrong == 2 and ".safetensors" in capsys.readouterr().err


def test_merged_sd2_768_v_file_is_labelled_by_its_prediction(tiny_sd2, tmp_path):
    lora = _lora(tiny_sd2, tmp_path)
    merged = merge(str(tiny_sd2), lora, 1.0, tmp_path / "m.safetensors", precision="fp32")
    with safe_open(merged, "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-v2-768-v"
        # ComfyUI computes a pooled output from OpenCLIP's projection: written (the identity), never missing
        projection = f.get_tensor("cond_stage_model.model.text_projection")
    assert torch.equal(projection, torch.eye(projection.shape[0]))


def test_v_prediction_sdxl_is_marked_and_the_mark_is_honoured(tiny_sdxl, tmp_path):
    import json

    model = tmp_path / "vpred-sdxl"
    shutil.copytree(tiny_sdxl, model)
    scheduler = model / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler.read_text())
    scheduler.write_text(json.dumps({**config, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}))
    lora = _lora(model, tmp_path)
    models = tmp_path / "models"
    shutil.copytree(tiny_sdxl, models / "configs" / "sdxl")  # an epsilon config: the marks must win over it
    merged = merge(str(model), lora, 1.0, models / "v.safetensors", precision="fp32")
    with safe_open(merged, "pt") as f:
        assert {"v_pred", "ztsnr"} <= set(f.keys())
    converted = resolve_model_path(str(merged))
    imported = json.loads((converted / "scheduler" / "scheduler_config.json").read_text())
    assert imported["prediction_type"] == "v_prediction" and imported["rescale_betas_zero_snr"] is True
    # an epsilon SDXL carries no mark
    plain = merge(str(tiny_sdxl), _lora(tiny_sdxl, tmp_path / "p"), 1.0, tmp_path / "e.safetensors")
    with safe_open(plain, "pt") as f:
        assert not {"v_pred", "ztsnr"} & set(f.keys())


@pytest.mark.parametrize("family", ["sd3", "flux", "flux2", "zimage"])
def test_merged_flow_model_is_the_transformer_file_people_share(family, tiny_sd3, tiny_flux, tiny_flux2, tiny_zimage,
                                                                tmp_path):
    """The merged flow model is the transformer alone in the original names; read back with the text encoders
    and VAE of a folder of the family, it gives base + LoRA."""
    model = {"sd3": tiny_sd3, "flux": tiny_flux, "flux2": tiny_flux2, "zimage": tiny_zimage}[family]
    data = write_dataset(tmp_path / "d", n=2)
    cfg = tiny_config(model, data, tmp_path / "out", **{
        "train.max_train_steps": 3, "sample.prompts": [], "output.save_state": False, "train.learning_rate": 1e-2,
        "dataset.validation_split": 0.0, "output.save_precision": "fp32"})
    lora = train.run(cfg, EventLog()).lora_path
    models = tmp_path / "models"
    shutil.copytree(model, models / "configs" / family)  # the companion: text encoders, VAE, tokenizers
    merged = merge(str(model), lora, 0.7, models / "merged.safetensors", precision="fp32")
    with safe_open(merged, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    block = {"flux": "double_blocks.0.img_attn.qkv.weight", "sd3": "joint_blocks.0.x_block.attn.qkv.weight",
             "flux2": "double_blocks.0.img_attn.qkv.weight", "zimage": "layers.0.attention.qkv.weight"}[family]
    assert block in keys and not any(k.startswith(("first_stage_model", "text_encoders", "transformer_blocks"))
                                     for k in keys)
    assert meta["modelspec.architecture"] == {"flux": "flux-1-dev", "sd3": "stable-diffusion-3-5-medium",
                                              "flux2": "flux-2-klein-4b-base", "zimage": "z-image-turbo"}[family]

    expected_pipe = load_pipeline(str(model), device="cpu")
    base = _image(expected_pipe)
    apply_lora(expected_pipe, lora, 0.7)
    expected = _image(expected_pipe)
    converted = resolve_model_path(str(merged))  # transformer from the file, the rest linked from the companion
    got = _image(load_pipeline(str(converted), device="cpu"))
    assert np.abs(expected - base).max() >= 1.0, "the LoRA does not change the image"
    assert np.abs(got - expected).max() <= 1.0  # fused weights: the same picture, to one level in 255
    if family != "flux":  # diffusers' own single-file reader agrees (its FLUX.1 reader assumes FLUX.1's widths)
        import diffusers

        cls = getattr(diffusers, {"sd3": "SD3Transformer2DModel", "flux2": "Flux2Transformer2DModel",
                                  "zimage": "ZImageTransformer2DModel"}[family])
        read = cls.from_single_file(str(merged), config=str(model), subfolder="transformer", local_files_only=True,
                                    torch_dtype=torch.float32)
        fused = load_pipeline(str(model), device="cpu", dtype=torch.float32)
        apply_lora(fused, lora, 1.0, adapter_name="m")
        fused.fuse_lora(lora_scale=0.7, adapter_names=["m"])
        fused.unload_lora_weights()
        ours = fused.transformer.state_dict()
        assert all(torch.allclose(read.state_dict()[k], ours[k], atol=1e-6) for k in ours)


def test_a_flow_transformer_file_without_a_companion_folder_says_what_to_get(tiny_flux, tmp_path):
    from core.base.flow_checkpoint import original_state_dict
    from core.base.models import ModelError, load_models
    from core.fsutil import save_safetensors

    alone = tmp_path / "models" / "flux-finetune.safetensors"
    alone.parent.mkdir()
    save_safetensors(alone, original_state_dict(load_models(str(tiny_flux)).denoiser, "flux"))
    with pytest.raises(ModelError) as err:
        resolve_model_path(str(alone))
    message = str(err.value)
    assert "FLUX.1 transformer" in message and "models/configs/flux" in message and "hf download" in message
    shutil.copytree(tiny_flux, tmp_path / "models" / "some-flux")  # any diffusers FLUX folder in models/ serves
    assert load_models(str(alone)).family.name == "flux"
