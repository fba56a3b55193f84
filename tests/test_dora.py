"""lora.dora: DoRA along the input axis, written as the dora_scale every reader applies, and read back."""

import numpy as np
import pytest
import torch
from conftest import EventLog, stop_then_resume, tiny_config, write_dataset
from safetensors.torch import load_file, save_file

from core import config as config_mod
from core.base.tiny import build_pipeline
from core.lora.adapters import peft_config
from core.lora.dora import add_dora, column_norms
from core.lora.lora_io import kohya_state_dict
from core.training import train

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def adapted(seed: int = 4):
    """A tiny pipeline with a non-zero DoRA: random LoRA factors and magnitudes away from the weights' norms."""
    pipe = build_pipeline()
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(peft_config("lora", 4, 8.0, ATTENTION, init=False))
    for magnitude in add_dora(pipe.unet):
        with torch.no_grad():
            magnitude.mul_(1 + 0.5 * torch.rand_like(magnitude))
    return pipe


def image(pipe) -> np.ndarray:
    out = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0))
    return np.asarray(out.images, dtype=np.float64)


def test_the_file_is_the_weight_every_reader_computes():
    """A1111's and ComfyUI's input-axis rule, written out: W' = (W + dW) * dora_scale / ||W + dW|| per input
    column. The layer's own output must be W' x + b."""
    pipe = adapted()
    tensors = kohya_state_dict(pipe.unet, None, family="sd1", dtype=torch.float32)
    path = next(p for p, _ in pipe.unet.named_modules() if p.endswith("attn1.to_q"))
    name = "lora_unet_" + path.replace(".", "_")
    layer = pipe.unet.get_submodule(path)
    base = layer.get_base_layer()
    scale = tensors[f"{name}.dora_scale"]
    assert scale.shape == (1, base.in_features)
    down, up, alpha = (tensors[f"{name}.{k}"] for k in ("lora_down.weight", "lora_up.weight", "alpha"))
    adapted_weight = base.weight + up @ down * (float(alpha) / down.shape[0])
    norms = adapted_weight.transpose(0, 1).reshape(base.in_features, -1).norm(dim=1, keepdim=True).transpose(0, 1)
    readers = adapted_weight * (scale / norms)
    x = torch.eye(base.in_features)
    with torch.no_grad():
        effective = (layer(x) - (base.bias if base.bias is not None else 0)).T
    torch.testing.assert_close(effective, readers, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(readers, adapted_weight, atol=1e-4)  # the magnitude changes the layer
    torch.testing.assert_close(column_norms(readers), scale.flatten(), rtol=1e-4, atol=1e-5)


def test_the_app_reads_and_merges_its_dora_files(tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    from core.lora.dora import fuse
    from core.lora.preview import apply_lora
    from core.lora.verify import verify

    pipe = adapted()
    trained = image(pipe)
    path = tmp_path / "dora.safetensors"
    save_file(kohya_state_dict(pipe.unet, None, family="sd1", dtype=torch.float32), str(path))
    base = build_pipeline()
    base.set_progress_bar_config(disable=True)
    before = image(base)
    apply_lora(base, path, 1.0)
    assert np.abs(image(base) - trained).max() < 1e-4
    assert np.abs(trained - before).max() > 1e-2
    base.disable_lora()
    assert np.abs(image(base) - before).max() < 1e-6  # switched off, the base model exactly
    base.enable_lora()
    fuse(base.unet, "lora", 1.0)  # what merge does
    base.unload_lora_weights()
    assert np.abs(image(base) - trained).max() < 1e-4
    model = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    result = verify(path, str(tiny_model), steps=2, pipe=model)
    assert result.layout == "lycoris" and result.ok and result.loads, result.summary()


def test_a_dora_locon_trains_verifies_and_resumes(tiny_model, tmp_path):

    data = write_dataset(tmp_path / "d", n=3)
    overrides = {"lora.dora": True, "lora.type": "locon", "lora.conv_rank": 2, "sample.prompts": [],
                 "output.save_every_n_steps": 0, "output.save_precision": "fp32", "train.max_train_steps": 4,
                 "train.learning_rate": 1e-2, "dataset.validation_split": 0.0}
    straight = train.run(tiny_config(tiny_model, data, tmp_path / "o", name="straight", **overrides), EventLog(),
                         final_check=True)
    tensors = load_file(str(straight.lora_path))
    scales = [k for k in tensors if k.endswith(".dora_scale")]
    assert any("attn1_to_q" in k for k in scales) and any("resnets_0_conv1" in k for k in scales)
    assert next(tensors[k] for k in scales if "conv1" in k).dim() == 4
    from safetensors import safe_open

    with safe_open(str(straight.lora_path), "pt") as f:
        args = f.metadata()["ss_network_args"]
    assert '"dora_wd": "True"' in args and '"algo": "locon"' in args
    cfg = tiny_config(tiny_model, data, tmp_path / "o", name="stopped", **overrides)
    stopped, resumed = stop_then_resume(cfg)
    assert stopped.status == "stopped" and resumed.status == "completed"
    resumed = load_file(str(cfg.run_dir / "stopped.safetensors"))
    for key in tensors:  # the magnitudes came back with the resume state
        torch.testing.assert_close(resumed[key], tensors[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("overrides, message", [
    ({"lora.dora": True, "lora.type": "loha"}, "lora.dora"),
    ({"lora.dora": True, "model.group_offload": True}, "group_offload"),
    ({"lora.dora": True, "output.save_diffusers_format": True}, "save_diffusers_format"),
])
def test_settings_dora_cannot_work_with_are_refused(overrides, message, tiny_model, tmp_path):
    with pytest.raises(config_mod.ConfigError, match=message):
        tiny_config(tiny_model, tmp_path, tmp_path / "o", **overrides)


def test_a_flux_run_with_dora_masks_and_blocks(tiny_flux, tmp_path):
    """The options on a flow transformer: DoRA (written under diffusers names, as its per-part scales need), a
    loss mask on FLUX's packed latents, and a block choice."""
    from PIL import Image

    data = write_dataset(tmp_path / "d", n=2, size=(64, 64))
    for picture in data.glob("*.png"):
        mask = np.zeros((64, 64), dtype=np.uint8)
        mask[:, :32] = 255
        Image.fromarray(mask).save(picture.with_name(picture.stem + ".mask.png"))
    cfg = tiny_config(tiny_flux, data, tmp_path / "out", **{
        "lora.dora": True, "dataset.masked_loss": True, "lora.blocks": ["single.*"], "train.max_train_steps": 2,
        "sample.prompts": [], "output.save_state": False, "dataset.validation_split": 0.0})
    log = EventLog()
    result = train.run(cfg, log)
    assert result.status == "completed"
    tensors = load_file(str(result.lora_path))
    assert tensors and all(k.startswith("lycoris_single_transformer_blocks_") for k in tensors)
    assert any(k.endswith(".dora_scale") for k in tensors)
    assert all(e.ok for e in log.of("lora_verified"))
