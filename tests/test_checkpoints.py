"""Single-file base models: family from the keys, config folders found offline, clear errors when missing."""

import pytest
import torch
from safetensors.torch import save_file

from core.base.checkpoints import CheckpointError, checkpoint_family, convert, converted_folder, find_config_folder
from core.base.models import ModelError, resolve_model_path

KEYS = {
    "sd1": "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    "sd2": "cond_stage_model.model.token_embedding.weight",
    "sdxl": "conditioner.embedders.1.model.token_embedding.weight",
}


def fake_checkpoint(path, family):
    save_file({KEYS[family]: torch.zeros(2, 2), "model.diffusion_model.out.2.bias": torch.zeros(2)}, path)
    return path


@pytest.mark.parametrize("family", KEYS)
def test_family_from_the_keys(tmp_path, family):
    assert checkpoint_family(fake_checkpoint(tmp_path / "m.safetensors", family)) == family


def test_a_lora_or_junk_is_refused(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, lora)
    with pytest.raises(CheckpointError, match="is a LoRA, not a base model"):
        checkpoint_family(lora)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot be read"):
        checkpoint_family(junk)


def test_config_folders_are_found_locally(tmp_path, tiny_model, tiny_sdxl):
    import shutil

    models = tmp_path / "models"
    shutil.copytree(tiny_sdxl, models / "my-xl")
    assert find_config_folder("sdxl", models) == models / "my-xl"  # any model of the family serves
    assert find_config_folder("sd1", models) is None
    shutil.copytree(tiny_model, models / "configs" / "sd1")
    assert find_config_folder("sd1", models) == models / "configs" / "sd1"


def test_offline_without_configs_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "models").mkdir()
    ckpt = fake_checkpoint(tmp_path / "models" / "pony.safetensors", "sdxl")
    with pytest.raises(CheckpointError) as info:
        convert(ckpt)
    message = str(info.value)
    assert "SDXL single-file checkpoint" in message and str(tmp_path / "models" / "configs" / "sdxl") in message
    assert "stabilityai/stable-diffusion-xl-base-1.0" in message
    with pytest.raises(ModelError, match="configs and tokenizers"):
        resolve_model_path(str(ckpt))
    assert not converted_folder(ckpt).exists()  # nothing half-made is left behind


def test_ckpt_files_are_read_without_running_code(tmp_path):
    ckpt = tmp_path / "old.ckpt"
    torch.save({"state_dict": {KEYS["sd2"]: torch.zeros(2, 2)}}, ckpt)
    assert checkpoint_family(ckpt) == "sd2"
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read as a .ckpt"):
        checkpoint_family(bad)
