"""verify-lora: coverage of the base model, shapes and alphas, diffusers' loader, and the effect on an image."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.lora.verify import verify
from core.training import train
from tests.conftest import EventLog, tiny_config, write_dataset
from tests.test_cli import core_cmd


@pytest.fixture(scope="module")
def trained_sd1(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("verify")
    data = write_dataset(root / "d", n=3)
    cfg = tiny_config(tiny_model, data, root / "out", name="v", **{
        "train.max_train_steps": 3, "sample.prompts": [], "output.save_state": False,
        "lora.train_text_encoder": True, "train.learning_rate": 1e-2})
    return train.run(cfg, EventLog()).lora_path


def test_a_trained_lora_passes_every_check(trained_sd1, tiny_model):
    result = verify(trained_sd1, str(tiny_model), steps=2)
    assert result.ok, result.summary()
    assert result.layout == "kohya" and result.family == "sd1"
    assert result.matched == result.modules > 0 and not result.unmatched
    assert result.loads is True and result.max_change >= 1.0 and result.mean_change > 0
    assert "OK:" in result.summary() and f"{result.modules} of {result.modules}" in result.summary()


def test_unmatched_names_are_listed_and_fail(trained_sd1, tiny_model, tmp_path):
    tensors = load_file(trained_sd1)
    renamed = {k.replace("lora_unet_down_blocks_1", "lora_unet_downblocks_1"): v for k, v in tensors.items()}
    bad = tmp_path / "renamed.safetensors"
    save_file(renamed, bad)
    result = verify(bad, str(tiny_model), image=False)
    assert not result.ok and result.unmatched
    assert all(name.startswith("lora_unet_downblocks_1") for name in result.unmatched)


def test_a_lora_for_another_family_maps_to_nothing(trained_sd1, tiny_sdxl):
    result = verify(trained_sd1, str(tiny_sdxl), image=False)
    assert not result.ok and result.matched == 0
    assert any("maps onto this base model" in p for p in result.problems)


def test_zero_weights_change_nothing_and_fail(trained_sd1, tiny_model, tmp_path):
    tensors = {k: (torch.zeros_like(v) if k.endswith("lora_up.weight") else v)
               for k, v in load_file(trained_sd1).items()}
    zero = tmp_path / "zero.safetensors"
    save_file(tensors, zero)
    result = verify(zero, str(tiny_model), steps=2)
    assert not result.ok and result.loads is True and result.max_change < 1.0
    assert any("does not change the image" in p for p in result.problems)


def test_bad_shapes_and_alphas_are_problems(trained_sd1, tiny_model, tmp_path):
    tensors = load_file(trained_sd1)
    key = next(k for k in tensors if k.endswith(".lora_up.weight") and k.startswith("lora_unet"))
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1], dtype=tensors[key].dtype)
    alpha = next(k for k in tensors if k.endswith(".alpha"))
    tensors[alpha] = torch.tensor(-1.0)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad)
    result = verify(bad, str(tiny_model), image=False)
    text = " ".join(result.problems)
    assert "but the base module is" in text and "not a positive number" in text


def test_the_command(trained_sd1, tiny_model, tmp_path, capsys):
    from core.cli import main

    out = core_cmd("verify-lora", trained_sd1, "--model", tiny_model, "--json", "--steps", "2")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] and report["loads"] and report["matched"] == report["modules"]
    # the refusals in this process (the same code the subprocess runs, without its start-up)
    capsys.readouterr()
    assert main(["verify-lora", str(tmp_path / "none.safetensors"), "--model", str(tiny_model)]) == 2
    assert "does not exist" in capsys.readouterr().err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    assert main(["verify-lora", str(junk), "--model", str(tiny_model)]) == 2
    assert "cannot be read" in capsys.readouterr().err
