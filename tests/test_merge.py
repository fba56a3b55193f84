"""Merge a LoRA into its base model, save one single file, load it back with this app's own loader."""

import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

from core.base.models import resolve_model_path
from core.base.sample import apply_lora, generate, load_pipeline
from core.lora.merge import merge
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


def test_merge_command_fp16_and_errors(tiny_model, tmp_path):
    lora = _lora(tiny_model, tmp_path)
    out16 = core_cmd("merge", "--model", tiny_model, "--lora", lora, "--scale", "1",
                     "--out", tmp_path / "m16.safetensors")
    assert out16.returncode == 0, out16.stderr
    out32 = core_cmd("merge", "--model", tiny_model, "--lora", lora, "--precision", "fp32",
                     "--out", tmp_path / "m32.safetensors")
    assert out32.returncode == 0, out32.stderr
    size16, size32 = ((tmp_path / n).stat().st_size for n in ("m16.safetensors", "m32.safetensors"))
    assert 0.45 < size16 / size32 < 0.55
    with safe_open(tmp_path / "m16.safetensors", "pt") as f:
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
    missing = core_cmd("merge", "--model", tiny_model, "--lora", tmp_path / "none.safetensors", "--out",
                       tmp_path / "x.safetensors")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    wrong = core_cmd("merge", "--model", tiny_model, "--lora", lora, "--out", tmp_path / "x.ckpt")
    assert wrong.returncode == 2 and ".safetensors" in wrong.stderr
