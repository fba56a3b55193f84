"""lora.type = locon / loha / lokr: trained through peft, written in the LyCORIS layout, read back everywhere.

The files are checked against a reader written here from ComfyUI's rules
(comfy/weight_adapter/{lora,loha,lokr}.py: which keys, which rank alpha is
divided by, how a convolution's update is reshaped), which knows nothing of
peft or of ``core.lora.adapters``; the update it computes for every module
must equal the one the trained peft layer applies. Then the app's own readers
(Prompt tab, ``verify-lora``, ``merge``) must reproduce the trained model's
image, and a short training run must end with a verified file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from core.base.families import get_family
from core.base.tiny import build_pipeline
from core.config import ConfigError
from core.lora.adapters import conv_targets, peft_config
from core.lora.lora_io import kohya_state_dict
from core.lora.verify import module_index, verify
from core.training import train
from tests.conftest import EventLog, tiny_config, write_dataset

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def comfy_delta(name: str, tensors: dict, shape) -> torch.Tensor:
    """One module's update as ComfyUI computes it at strength 1 (its formulas, written out here)."""
    t = {k[len(name) + 1:]: v.float() for k, v in tensors.items() if k.startswith(name + ".")}
    alpha = t.get("alpha")
    if "hada_w1_a" in t:  # LoHa: alpha over hada_w1_b's rows
        scale = float(alpha) / t["hada_w1_b"].shape[0] if alpha is not None else 1.0
        diff = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        return diff.reshape(shape) * scale
    if any(k.startswith("lokr_") for k in t):  # LoKr: alpha over w2_b's (else w1_b's) rows, or no scale at all
        dim = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
        scale = float(alpha) / dim if alpha is not None and dim is not None else 1.0
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        return torch.kron(w1, w2).reshape(shape) * scale
    down, up = t["lora_down.weight"], t["lora_up.weight"]  # LoRA / LoCon: alpha over down's rows
    scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
    return (up.flatten(1) @ down.flatten(1)).reshape(shape) * scale


def adapted(kind: str, family: str = "sd15", seed: int = 1):
    """A tiny pipeline with a non-zero adapter of ``kind`` on its attention and (but LoKr's) convolutions."""
    pipe = build_pipeline(family=family)
    pipe.set_progress_bar_config(disable=True)
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    torch.manual_seed(seed)
    conv = conv_targets(denoiser)
    targets = ATTENTION if conv else ["to_q", "to_k", "to_v"]
    denoiser.add_adapter(peft_config(kind, 4, 16.0, targets, conv=conv, conv_rank=2, conv_alpha=4.0, init=False))
    return pipe, denoiser


def image(pipe, **kwargs) -> np.ndarray:
    out = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0), **kwargs)
    return np.asarray(out.images, dtype=np.float64)


@pytest.mark.parametrize("family, name", [("sd15", "sd1"), ("sdxl", "sdxl")])
@pytest.mark.parametrize("kind", ["locon", "loha", "lokr"])
def test_every_module_is_what_comfyui_computes(kind, family, name):
    pipe, unet = adapted(kind, family)
    tensors = kohya_state_dict(unet, None, family=name, dtype=torch.float32)
    suffixes = {k.split(".", 1)[1] for k in tensors}
    expected = {"locon": {"lora_down.weight", "lora_up.weight"}, "loha": {"hada_w1_a", "hada_w2_b"},
                "lokr": {"lokr_w1"}}[kind]
    assert expected <= suffixes, suffixes
    index = module_index(unet, [getattr(pipe, n) for n in get_family(name).text_encoders], get_family(name))
    layers = {id(m.get_base_layer()): m for m in unet.modules() if hasattr(m, "get_delta_weight")}
    names = {k.rsplit(".", 1)[0] if k.endswith(".alpha") else k.split(".hada_")[0].split(".lokr_")[0]
             .split(".lora_")[0] for k in tensors}
    convs = 0
    for module_name in names:
        module = index[module_name]  # every module lands on a layer of the base model under its kohya name
        trained = layers[id(module)].get_delta_weight("default").float()
        assert trained.abs().max() > 0
        torch.testing.assert_close(comfy_delta(module_name, tensors, module.weight.shape), trained,
                                   rtol=1e-5, atol=1e-7)
        convs += isinstance(module, torch.nn.Conv2d) and module.kernel_size == (3, 3)
    assert convs > 0, "the ResNet convolutions carry the adapter"
    if name == "sdxl":
        assert any("input_blocks" in n for n in names)  # the original model's names, as for its LoRAs


@pytest.mark.parametrize("kind", ["locon", "loha", "lokr"])
def test_the_app_reads_its_files_back(kind, tiny_model, tmp_path):
    """Prompt tab (apply_lora), verify-lora and merge's fuse reproduce the trained adapter's image."""
    from diffusers import StableDiffusionPipeline

    from core.lora.preview import apply_lora

    pipe, unet = adapted(kind)
    trained = image(pipe)
    path = tmp_path / f"{kind}.safetensors"
    save_file(kohya_state_dict(unet, None, family="sd1", dtype=torch.float32),
              str(path))
    base = build_pipeline()
    base.set_progress_bar_config(disable=True)
    before = image(base)
    apply_lora(base, path, 1.0)
    assert np.abs(image(base) - trained).max() < 1e-4
    assert np.abs(trained - before).max() > 1e-2, "the adapter changes the image"
    base.set_adapters(["lora"], adapter_weights=[0.5])  # strength works as for a LoRA
    half = image(base)
    assert 1e-3 < np.abs(half - before).max() < np.abs(trained - before).max()
    base.set_adapters(["lora"], adapter_weights=[1.0])
    base.fuse_lora(lora_scale=1.0, adapter_names=["lora"])  # what merge does
    base.unload_lora_weights()
    assert np.abs(image(base) - trained).max() < 1e-4

    model = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    result = verify(path, str(tiny_model), steps=2, pipe=model)
    assert result.layout == ("kohya" if kind == "locon" else "lycoris"), result.summary()
    assert result.matched == result.modules > 0, result.summary()
    assert result.ok and result.loads and result.max_change >= 1.0, result.summary()


def test_a_broken_lycoris_file_is_a_problem(tiny_model, tmp_path):
    pipe, unet = adapted("loha")
    tensors = kohya_state_dict(unet, None, family="sd1", dtype=torch.float32)
    key = next(k for k in tensors if k.endswith("hada_w1_b"))
    tensors[key] = tensors[key][:, :-1].contiguous()  # a column short: its product no longer fits the layer
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    result = verify(path, str(tiny_model), image=False)
    assert not result.ok and any(key.rsplit(".", 1)[0] in p for p in result.problems), result.problems


def test_a_flow_transformer_lokr_keeps_diffusers_names(tmp_path):
    """FLUX: a Kronecker product cannot be stacked into the fused qkv, so the file keeps diffusers' names under
    the prefix ComfyUI maps (lycoris_), and reads back to the same image."""
    from core.base.tiny_flow import build_flux
    from core.lora.preview import apply_lora

    pipe = build_flux()
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(2)
    pipe.transformer.add_adapter(peft_config("lokr", 4, 2.0, ["to_q", "to_k", "to_v"], init=False))
    kwargs = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "np", "max_sequence_length": 16}
    trained = np.asarray(pipe("a photo", generator=torch.Generator().manual_seed(0), **kwargs).images)
    tensors = kohya_state_dict(pipe.transformer, None, family="flux", dtype=torch.float32)
    assert all(k.startswith("lycoris_transformer_blocks_") or k.startswith("lycoris_single_transformer_blocks_")
               for k in tensors), sorted(tensors)[:3]
    path = tmp_path / "flux-lokr.safetensors"
    save_file(tensors, str(path))
    base = build_flux()
    base.set_progress_bar_config(disable=True)
    apply_lora(base, path, 1.0)
    again = np.asarray(base("a photo", generator=torch.Generator().manual_seed(0), **kwargs).images)
    assert np.abs(again - trained).max() < 1e-4


@pytest.mark.parametrize("overrides, message", [
    ({"lora.type": "locon"}, "lora.conv_rank"),
    ({"lora.conv_rank": 4}, "lora.type = 'locon'"),
    ({"lora.type": "loha", "lora.dropout": 0.1}, "lora.dropout"),
    ({"lora.type": "lokr", "train.loraplus_lr_ratio": 16.0}, "loraplus"),
    ({"lora.type": "loha", "output.save_diffusers_format": True}, "save_diffusers_format"),
    ({"lora.type": "lokr", "lora.lokr_factor": 1}, "lokr_factor"),
])
def test_settings_that_cannot_work_are_refused(overrides, message, tiny_model, tmp_path):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tiny_model, tmp_path, tmp_path / "out", **overrides)


def test_a_loha_with_convolutions_trains_and_verifies(tiny_model, tmp_path):
    data = write_dataset(tmp_path / "d", n=3)
    cfg = tiny_config(tiny_model, data, tmp_path / "out", name="loha", **{
        "lora.type": "loha", "lora.conv_rank": 2, "lora.conv_alpha": 1.0, "train.max_train_steps": 3,
        "sample.prompts": [], "output.save_state": False, "train.learning_rate": 1e-2})
    log = EventLog()
    result = train.run(cfg, log, final_check=True)
    tensors = load_file(str(result.lora_path))
    assert any(k.endswith("resnets_0_conv1.hada_w1_a") for k in tensors)
    assert any(k.endswith("attn1_to_q.hada_w2_b") for k in tensors)
    assert not any("lora_down" in k for k in tensors)
    verified = [e for e in log.events if type(e).__name__ == "LoraVerified"][-1]
    assert verified.ok and verified.mean_change > 0, verified
    from safetensors import safe_open

    with safe_open(str(result.lora_path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {"algo": "loha", "conv_dim": "2", "conv_alpha": "1"}
