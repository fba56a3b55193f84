"""core.lora.lora_io: a kohya file written from a peft adapter reproduces that adapter.

The proof is behavioural: the file is loaded by a real reader (diffusers'
``load_lora_weights``, and a small A1111-style "merge into the weights"
reader written here) into a fresh copy of the same base model, and the image
it then generates must equal the in-memory adapter's image. ``lora_alpha``
is 8 and ``r`` is 4 everywhere, so a file that stores alpha = rank (the bug
this module exists to avoid) halves the LoRA's effect and fails.
"""

from __future__ import annotations

import importlib.metadata
import json
import math

import numpy as np
import pytest
import torch
from packaging.version import Version
from peft import LoraConfig, inject_adapter_in_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from core.base.tiny import build_pipeline
from core.lora.lora_info import read_lora_info
from core.lora.lora_io import (
    LoraFileError,
    kohya_metadata,
    kohya_state_dict,
    save_kohya_lora,
)

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# Every kind of layer an SD-1.x LoRA may touch: 3x3 and 1x1 convs, the time
# embedding projection, the feed-forward, the CLIP MLP.
UNET_ALL = UNET_TARGETS + ["conv1", "conv2", "conv_shortcut", "proj_in", "proj_out", "time_emb_proj",
                           "ff.net.0.proj", "ff.net.2"]
TE_ALL = TE_TARGETS + ["fc1", "fc2"]
RANK, ALPHA = 4, 8


@pytest.fixture
def transformers_add_adapter(monkeypatch):
    """Let ``CLIPTextModel.add_adapter`` run on the installed peft.

    transformers 5.24's ``add_adapter`` refuses peft older than 0.22.0, and
    0.21.2 is the newest release there is (its ``load_adapter``, which
    diffusers uses, has no such gate). The peft API underneath works with
    0.21.2; only the version gate is skipped, and only while peft is older.
    """
    import transformers.integrations.peft as tp

    if Version(importlib.metadata.version("peft")) < Version(tp.MIN_PEFT_VERSION):
        monkeypatch.setattr(tp, "check_peft_version", lambda min_version: None)


def lora_config(targets, **kwargs) -> LoraConfig:
    # init_lora_weights=False: lora_B is random, not zero, so the adapter acts.
    return LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False, **kwargs)


def adapt(pipe, unet_targets=UNET_TARGETS, te_targets=None, **kwargs):
    """Add non-zero adapters (seeded, so every call makes the same ones) and return ``pipe``."""
    torch.manual_seed(1)
    if unet_targets:
        pipe.unet.add_adapter(lora_config(unet_targets, **kwargs))
    if te_targets:
        # What core.training.train does: transformers' add_adapter refuses the installed peft.
        inject_adapter_in_model(lora_config(te_targets, **kwargs), pipe.text_encoder)
    return pipe


def fresh(tiny_model=None):
    """The base pipeline: from the saved folder when given, else built in memory (same weights)."""
    if tiny_model is None:
        pipe = build_pipeline(seed=0)
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    out = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=generator)
    return out.images


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def loaded_with_diffusers(path, tiny_model=None):
    pipe = fresh(tiny_model)
    pipe.load_lora_weights(str(path))
    return pipe


def merged_like_a1111(path):
    """A second, independent reader: add ``up @ down * alpha / rank`` into each base weight.

    This is what A1111/ComfyUI do with a kohya file; it knows nothing of
    peft or diffusers' key conversion, so it checks names and alphas on its own.
    """
    pipe = fresh()
    tensors = load_file(str(path))
    modules = {"lora_unet_" + n.replace(".", "_"): m for n, m in pipe.unet.named_modules()}
    # transformers 5 dropped CLIPTextModel's `text_model` level; kohya names keep it.
    te_root = "" if hasattr(pipe.text_encoder, "text_model") else "text_model."
    modules.update({"lora_te_" + (te_root + n).replace(".", "_"): m
                    for n, m in pipe.text_encoder.named_modules()})
    with torch.no_grad():
        for key in [k for k in tensors if k.endswith(".alpha")]:
            name = key[: -len(".alpha")]
            down = tensors[f"{name}.lora_down.weight"].float()
            up = tensors[f"{name}.lora_up.weight"].float()
            weight = modules[name].weight
            delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
            weight += delta * (tensors[key].item() / down.shape[0])
    return pipe


@pytest.fixture(scope="module")
def base_image():
    return generate(fresh())


# --------------------------------------------------------------------------
# the adapter acts (otherwise the round trips below would prove nothing)


@pytest.mark.parametrize("unet_targets, te_targets", [(UNET_TARGETS, None), (None, TE_TARGETS)],
                         ids=["unet", "text_encoder"])
def test_adapter_changes_the_image(base_image, unet_targets, te_targets):
    image = generate(adapt(fresh(), unet_targets, te_targets))
    assert max_diff(image, base_image) > 1e-2, "LoRA should change the output"


# --------------------------------------------------------------------------
# round trips through diffusers' kohya reader


@pytest.mark.parametrize(
    "te_targets, dtype, atol",
    [
        (None, torch.float32, 1e-4),
        (TE_TARGETS, torch.float32, 1e-4),
        (TE_TARGETS, torch.float16, 3e-3),
        (TE_TARGETS, torch.bfloat16, 3e-2),
    ],
    ids=["unet-fp32", "unet+te-fp32", "unet+te-fp16", "unet+te-bf16"],
)
def test_saved_file_reproduces_adapter(tmp_path, tiny_model, base_image, te_targets, dtype, atol):
    pipe = adapt(fresh(tiny_model), UNET_TARGETS, te_targets)
    expected = generate(pipe)
    text_encoder = pipe.text_encoder if te_targets else None
    path = save_kohya_lora(tmp_path / "lora.safetensors", pipe.unet, text_encoder, dtype=dtype)

    loaded = loaded_with_diffusers(path, tiny_model)
    image = generate(loaded)
    assert max_diff(image, expected) <= atol
    assert max_diff(image, base_image) > 1e-2
    # diffusers read the real alpha back, not the rank.
    (config,) = loaded.unet.peft_config.values()
    assert (config.r, config.lora_alpha) == (RANK, ALPHA)
    if te_targets:
        (config,) = loaded.text_encoder.peft_config.values()
        assert (config.r, config.lora_alpha) == (RANK, ALPHA)


def test_alpha_equal_to_rank_would_be_caught(tmp_path):
    """Negative control: the same file with alpha overwritten by the rank must NOT match."""
    pipe = adapt(fresh(), UNET_TARGETS, TE_TARGETS)
    expected = generate(pipe)
    tensors = kohya_state_dict(pipe.unet, pipe.text_encoder, dtype=torch.float32)
    wrong = {k: torch.tensor(float(RANK)) if k.endswith(".alpha") else v for k, v in tensors.items()}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    assert max_diff(generate(loaded_with_diffusers(tmp_path / "wrong.safetensors")), expected) > 1e-2


def test_conv_and_all_linear_layers_round_trip(tmp_path):
    pipe = adapt(fresh(), UNET_ALL, TE_ALL)
    expected = generate(pipe)
    path = save_kohya_lora(tmp_path / "all.safetensors", pipe.unet, pipe.text_encoder, dtype=torch.float32)

    tensors = load_file(str(path))
    conv_down = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
    assert conv_down.shape == (RANK, 32, 3, 3)
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (32, RANK, 1, 1)
    assert "lora_te_text_model_encoder_layers_4_mlp_fc2.alpha" in tensors
    assert max_diff(generate(loaded_with_diffusers(path)), expected) <= 1e-4
    assert max_diff(generate(merged_like_a1111(path)), expected) <= 1e-4


def test_per_module_rank_and_alpha_are_kept(tmp_path):
    """rank_pattern / alpha_pattern: each module's own r and alpha go in the file.

    Checked with the merge reader: diffusers 0.42.1 loads kohya files with
    differing alphas on attention layers using one alpha for all (its
    alpha_pattern keys never match), so it cannot judge this file.
    """
    pipe = fresh()
    torch.manual_seed(1)
    pipe.unet.add_adapter(lora_config(UNET_TARGETS, rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 16}))
    inject_adapter_in_model(lora_config(TE_TARGETS, alpha_pattern={"out_proj": 2}), pipe.text_encoder)
    expected = generate(pipe)
    path = save_kohya_lora(tmp_path / "p.safetensors", pipe.unet, pipe.text_encoder, dtype=torch.float32)

    tensors = load_file(str(path))
    prefix = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_"
    assert tensors[prefix + "to_v.alpha"].item() == 16.0
    assert tensors[prefix + "to_q.alpha"].item() == ALPHA
    assert tensors[prefix + "to_k.lora_down.weight"].shape[0] == 2
    assert tensors["lora_te_text_model_encoder_layers_2_self_attn_out_proj.alpha"].item() == 2.0
    assert max_diff(generate(merged_like_a1111(path)), expected) <= 1e-4
    info = read_lora_info(path)
    assert (info["rank"], info["alpha"]) == (RANK, None)


def test_rslora_is_written_as_equivalent_alpha(tmp_path):
    """rsLoRA scales by alpha/sqrt(r); kohya loaders divide by r, so alpha*sqrt(r) is stored."""
    pipe = adapt(fresh(), UNET_TARGETS, TE_TARGETS, use_rslora=True)
    expected = generate(pipe)
    path = save_kohya_lora(tmp_path / "rs.safetensors", pipe.unet, pipe.text_encoder, dtype=torch.float32)
    assert read_lora_info(path)["alpha"] == ALPHA * math.sqrt(RANK)
    assert max_diff(generate(loaded_with_diffusers(path)), expected) <= 1e-4


# --------------------------------------------------------------------------
# the tensors themselves


def test_keys_alphas_and_dtypes():
    pipe = adapt(fresh(), UNET_TARGETS, TE_TARGETS)
    tensors = kohya_state_dict(pipe.unet, pipe.text_encoder)
    n_unet = 4 * 2 * 6  # q,k,v,out x attn1,attn2 x 6 transformer blocks in the tiny UNet
    n_te = 4 * 5  # q,k,v,out x 5 CLIP layers
    assert len(tensors) == 3 * (n_unet + n_te)
    assert sum(k.startswith("lora_unet_") for k in tensors) == 3 * n_unet
    assert sum(k.startswith("lora_te_") for k in tensors) == 3 * n_te

    block = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1"
    for key in (f"{block}_to_q.lora_down.weight", f"{block}_to_out_0.lora_up.weight", f"{block}_to_q.alpha",
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"):
        assert key in tensors, key
    for key, t in tensors.items():
        assert t.device.type == "cpu" and t.is_contiguous()
        if key.endswith(".alpha"):
            assert t.shape == () and t.dtype == torch.float32 and t.item() == ALPHA
        else:
            assert t.dtype == torch.float16  # the default save dtype

    layer = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert torch.equal(tensors[f"{block}_to_q.lora_down.weight"], layer.lora_A["default"].weight.half())
    assert torch.equal(tensors[f"{block}_to_q.lora_up.weight"], layer.lora_B["default"].weight.half())


def test_wrapped_models_export_plain_names():
    """torch.compile (and DDP) wrap the model; their prefixes must not reach the keys."""
    pipe = adapt(fresh(), UNET_TARGETS)
    compiled = torch.compile(pipe.unet)  # wrapping only: nothing is compiled until it is called
    assert kohya_state_dict(compiled).keys() == kohya_state_dict(pipe.unet).keys()


def test_low_precision_base_with_fp32_lora():
    """The training setup: base weights in bf16, LoRA parameters upcast to fp32."""
    pipe = fresh()
    pipe.unet.to(torch.bfloat16)
    adapt(pipe, UNET_TARGETS)
    for p in pipe.unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    tensors = kohya_state_dict(pipe.unet, dtype=torch.float32)
    layer = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_k
    down = tensors["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"]
    assert down.dtype == torch.float32 and torch.equal(down, layer.lora_A["default"].weight)


def test_text_encoder_add_adapter_exports_the_same(transformers_add_adapter):
    """``CLIPTextModel.add_adapter`` and ``peft.inject_adapter_in_model`` give the same tensors,
    also when the model carries no ``peft_config`` (the export reads the layers)."""
    unet = adapt(fresh(), UNET_TARGETS).unet
    injected = adapt(fresh(), None, TE_TARGETS).text_encoder
    del injected.peft_config
    added = fresh().text_encoder
    torch.manual_seed(1)
    added.add_adapter(lora_config(TE_TARGETS))
    ours = kohya_state_dict(unet, injected, dtype=torch.float32)
    theirs = kohya_state_dict(unet, added, dtype=torch.float32)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


# --------------------------------------------------------------------------
# metadata


def test_kohya_metadata_formats(tmp_path):
    base = tmp_path / "my-base-model"
    base.mkdir()
    meta = kohya_metadata(rank=4, alpha=8, output_name="sks_dog", resolution=512, steps=500,
                          learning_rate=1e-4, base_model=str(base), train_text_encoder=False,
                          extra={"ss_seed": 42, "ss_flip_aug": True,
                                 "ss_tag_frequency": {"dogs": {"sks": 3}}})
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "8.0")
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sd_v1", "False")
    assert meta["ss_resolution"] == "(512, 512)"
    assert (meta["ss_steps"], meta["ss_learning_rate"]) == ("500", "0.0001")
    assert meta["ss_sd_model_name"] == "my-base-model"  # no local path leaks into a shared file
    assert meta["ss_network_train_unet_only"] == "True"
    assert json.loads(meta["ss_network_args"]) == {}
    assert float(meta["ss_training_finished_at"]) > 1.6e9
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert (meta["ss_seed"], meta["ss_flip_aug"]) == ("42", "True")
    assert json.loads(meta["ss_tag_frequency"]) == {"dogs": {"sks": 3}}
    assert kohya_metadata(rank=4, alpha=8, output_name="x", resolution=(768, 512), steps=1, learning_rate=1,
                          base_model="runwayml/stable-diffusion-v1-5", train_text_encoder=True)[
        "ss_network_train_unet_only"] == "False"


def test_metadata_is_written_as_strings(tmp_path):
    pipe = adapt(fresh(), UNET_TARGETS, TE_TARGETS)
    meta = kohya_metadata(rank=RANK, alpha=ALPHA, output_name="sks", resolution=64, steps=10,
                          learning_rate=1e-4, base_model="tiny", train_text_encoder=True)
    path = save_kohya_lora(tmp_path / "m.safetensors", pipe.unet, pipe.text_encoder,
                           metadata={**meta, "ss_epoch": 3, "ss_full_fp16": False, "ss_noise_offset": 0.05})
    with safe_open(str(path), framework="pt") as f:
        stored = f.metadata()
    assert (stored["ss_epoch"], stored["ss_full_fp16"], stored["ss_noise_offset"]) == ("3", "False", "0.05")
    assert stored["ss_output_name"] == "sks" and stored["ss_network_alpha"] == "8.0"

    with pytest.raises(ValueError, match="ss_seed"):
        save_kohya_lora(tmp_path / "none.safetensors", pipe.unet, metadata={"ss_seed": None})
    assert not (tmp_path / "none.safetensors").exists()


def test_minimum_metadata_without_caller_metadata(tmp_path):
    """A1111 treats a LoRA without any metadata as of unknown SD version; we always write the basics."""
    pipe = adapt(fresh(), UNET_TARGETS)
    info = read_lora_info(save_kohya_lora(tmp_path / "bare.safetensors", pipe.unet))
    meta = info["metadata"]
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "8.0")
    assert meta["ss_network_train_unet_only"] == "True"


# --------------------------------------------------------------------------
# read_lora_info


def test_read_lora_info_kohya(tmp_path):
    pipe = adapt(fresh(), UNET_TARGETS, TE_TARGETS)
    info = read_lora_info(save_kohya_lora(tmp_path / "k.safetensors", pipe.unet, pipe.text_encoder))
    assert {k: v for k, v in info.items() if k != "metadata"} == {
        "modules": 48 + 20, "rank": RANK, "alpha": float(ALPHA), "text_encoder": True, "unet": True,
        "format": "kohya",
    }
    unet_only = read_lora_info(save_kohya_lora(tmp_path / "u.safetensors", pipe.unet))
    assert (unet_only["text_encoder"], unet_only["unet"], unet_only["modules"]) == (False, True, 48)


def test_read_lora_info_diffusers_format(tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    pipe = adapt(fresh(), UNET_TARGETS, TE_TARGETS)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict(),
    )
    info = read_lora_info(tmp_path / "pytorch_lora_weights.safetensors")
    summary = (info["format"], info["modules"], info["rank"], info["alpha"])
    assert summary == ("diffusers", 68, RANK, float(ALPHA))
    assert info["unet"] and info["text_encoder"]


def test_read_lora_info_not_a_lora(tmp_path):
    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "w.safetensors"), metadata={"a": "b"})
    info = read_lora_info(tmp_path / "w.safetensors")
    assert (info["format"], info["modules"], info["rank"], info["alpha"]) == ("unknown", 0, 0, None)
    assert info["metadata"] == {"a": "b"}


# --------------------------------------------------------------------------
# errors


def test_model_without_adapter_is_refused():
    pipe = fresh()
    with pytest.raises(ValueError, match="no LoRA adapter named 'default'.*none"):
        kohya_state_dict(pipe.unet)
    adapt(pipe, UNET_TARGETS)
    with pytest.raises(ValueError, match="adapter named 'style'.*default"):
        kohya_state_dict(pipe.unet, adapter_name="style")
    with pytest.raises(ValueError, match="text encoder has no LoRA adapter"):
        kohya_state_dict(pipe.unet, pipe.text_encoder)


def test_dora_is_refused():
    pipe = adapt(fresh(), UNET_TARGETS, use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        kohya_state_dict(pipe.unet)


def test_bad_dtype_and_suffix_are_refused(tmp_path):
    pipe = adapt(fresh(), UNET_TARGETS)
    with pytest.raises(ValueError, match="dtype"):
        kohya_state_dict(pipe.unet, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_kohya_lora(tmp_path / "lora.ckpt", pipe.unet)


def test_corrupt_or_missing_file_is_reported_by_name(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"this is not a safetensors file")
    with pytest.raises(LoraFileError, match="broken.safetensors"):
        read_lora_info(bad)
    pipe = adapt(fresh(), UNET_TARGETS)
    truncated = save_kohya_lora(tmp_path / "cut.safetensors", pipe.unet)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(LoraFileError, match="cut.safetensors"):
        read_lora_info(truncated)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        read_lora_info(tmp_path / "missing.safetensors")
