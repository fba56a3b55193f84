"""core.lora.kohya_names: diffusers UNet paths -> the original (LDM) names kohya writes for SDXL.

Three kinds of proof, none hand-written tables of the tiny models:

* every parameter of small SD-shaped UNets, renamed to its LDM path, goes
  through diffusers' ``convert_ldm_unet_checkpoint`` (the reader behind
  ``from_single_file``) back to exactly the diffusers parameter it came from;
* for the real SD 1.5 and SDXL layouts (configs only, nothing built), the
  sampler names are the ones those checkpoints are known to contain;
* a peft LoRA on a tiny SDXL pipeline, written under the LDM names and loaded
  by diffusers' ``load_lora_weights`` into a fresh pipeline, reproduces the
  adapter's image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from core.lora.kohya_names import kohya_unet_key, ldm_unet_path

RANK, ALPHA = 4, 8  # alpha != rank, so a lost alpha shows up as a different image
TIME_DIM, TEXT_DIM, PROJ_DIM = 8, 32, 32

# SDXL-shaped: two levels, the first without attention, two transformer layers deep in the second.
SDXL_2 = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=2,
    cross_attention_dim=2 * TEXT_DIM,
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_DIM,
    # six size/crop numbers embedded to TIME_DIM each, plus the pooled text
    projection_class_embeddings_input_dim=6 * TIME_DIM + PROJ_DIM,
    sample_size=32,
    norm_num_groups=32,
)
# Real SDXL's block pattern: three levels, attention in the last two, an upsampler after attention.
SDXL_3 = dict(
    SDXL_2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64),
    transformer_layers_per_block=(1, 2, 2),
    attention_head_dim=(2, 4, 4),
)
# SD-1.x pattern: attention first, the last down / first up block without,
# so an upsampler follows a block with no attention (output_blocks.N.1.conv).
SD1 = dict(
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=2,
    cross_attention_dim=32,
    attention_head_dim=8,
    sample_size=32,
    norm_num_groups=32,
)
# One resnet per block, to see that L is read from the config.
SD1_L1 = dict(SD1, layers_per_block=1)
UNETS = {"sdxl-2-level": SDXL_2, "sdxl-3-level": SDXL_3, "sd1": SD1, "sd1-one-layer": SD1_L1}

# The full-size layouts, as configs (these are diffusers' defaults plus the SDXL changes).
SD15_CONFIG = dict(
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=2,
)
SDXL_CONFIG = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    addition_embed_type="text_time",
)


def build_unet(config: dict):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**config)


def lora_layer_paths(unet) -> list[str]:
    """Every module of ``unet`` a kohya LoRA can adapt (Linear and Conv2d)."""
    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    return [path for path, module in unet.named_modules() if isinstance(module, kinds)]


# ---------------------------------------------------------------------------
# the mapping, checked against diffusers' LDM checkpoint reader
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(UNETS))
def test_every_weight_maps_back_through_the_ldm_checkpoint_reader(name):
    from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

    unet = build_unet(UNETS[name])
    weights = unet.state_dict()
    ldm = {}
    for key, tensor in weights.items():
        module, param = key.rsplit(".", 1)
        ldm[f"{LDM_UNET_KEY}{ldm_unet_path(module, unet.config)}.{param}"] = tensor
    assert len(ldm) == len(weights), "two diffusers parameters got the same LDM name"

    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))

    assert set(back) == set(weights)
    # the very tensor each name came from, not merely a tensor of the same shape
    assert [k for k in weights if back[k] is not weights[k]] == []


@pytest.mark.parametrize("name", list(UNETS))
def test_every_lora_layer_has_a_name_in_both_styles(name):
    unet = build_unet(UNETS[name])
    paths = lora_layer_paths(unet)
    assert len(paths) > 40
    for ldm in (True, False):
        keys = [kohya_unet_key(p, unet.config, ldm=ldm) for p in paths]
        assert len(set(keys)) == len(keys)
        assert all(k.startswith("lora_unet_") and "." not in k for k in keys)
    ldm_keys = {kohya_unet_key(p, unet.config, ldm=True) for p in paths}
    assert not any(word in k for k in ldm_keys for word in ("down_blocks", "up_blocks", "mid_block"))


def test_names_of_the_real_sdxl_layout():
    """Spot checks against names SDXL checkpoints and kohya SDXL LoRAs contain."""
    expected = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q":
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj":
            "input_blocks.8.1.transformer_blocks.9.ff.net.0.proj",
        "down_blocks.1.attentions.1.proj_in": "input_blocks.5.1.proj_in",
        "mid_block.attentions.0.transformer_blocks.3.attn2.to_out.0":
            "middle_block.1.transformer_blocks.3.attn2.to_out.0",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": "output_blocks.0.1.transformer_blocks.0.attn2.to_k",
        "up_blocks.1.attentions.2.proj_out": "output_blocks.5.1.proj_out",
        "conv_in": "input_blocks.0.0",
        "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
        "down_blocks.0.resnets.1.time_emb_proj": "input_blocks.2.0.emb_layers.1",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
        "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
        "down_blocks.2.resnets.1.conv2": "input_blocks.8.0.out_layers.3",
        "mid_block.resnets.0.conv1": "middle_block.0.in_layers.2",
        "mid_block.resnets.1.norm2": "middle_block.2.out_layers.0",
        "up_blocks.0.resnets.2.conv_shortcut": "output_blocks.2.0.skip_connection",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.2.resnets.2.conv2": "output_blocks.8.0.out_layers.3",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    assert {p: ldm_unet_path(p, SDXL_CONFIG) for p in expected} == expected
    assert (kohya_unet_key("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", SDXL_CONFIG, ldm=True)
            == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q")


def test_sampler_names_of_the_real_sd15_layout():
    """SD 1.5 checkpoints hold input_blocks.3/6/9.0.op and output_blocks.2.1 / 5.2 / 8.2.conv.

    Its first up block has no attention, so its upsampler is the layer's
    second module (.1), not the third.
    """
    downs = [ldm_unet_path(f"down_blocks.{i}.downsamplers.0.conv", SD15_CONFIG) for i in range(3)]
    ups = [ldm_unet_path(f"up_blocks.{i}.upsamplers.0.conv", SD15_CONFIG) for i in range(3)]
    assert downs == ["input_blocks.3.0.op", "input_blocks.6.0.op", "input_blocks.9.0.op"]
    assert ups == ["output_blocks.2.1.conv", "output_blocks.5.2.conv", "output_blocks.8.2.conv"]
    assert ldm_unet_path("down_blocks.3.resnets.1.conv2", SD15_CONFIG) == "input_blocks.11.0.out_layers.3"
    assert ldm_unet_path("up_blocks.3.attentions.2.proj_out", SD15_CONFIG) == "output_blocks.11.1.proj_out"


def test_diffusers_names_are_kept_when_ldm_is_off():
    path = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"
    assert kohya_unet_key(path, SD15_CONFIG, ldm=False) == "lora_unet_" + path.replace(".", "_")


@pytest.mark.parametrize(
    "path, words",
    [
        ("down_blocks.0.attentions.0.proj_in", "no attentions"),  # SDXL's first block is plain
        ("up_blocks.2.attentions.0.proj_in", "no attentions"),
        ("down_blocks.3.resnets.0.conv1", "out of range"),
        ("down_blocks.0.resnets.2.conv1", "out of range"),  # down blocks have L resnets
        ("up_blocks.0.resnets.3.conv1", "out of range"),  # up blocks have L + 1
        ("mid_block.resnets.2.conv1", "out of range"),
        ("mid_block.attentions.1.proj_in", "out of range"),
        ("down_blocks.2.downsamplers.0.conv", "no downsampler"),
        ("up_blocks.2.upsamplers.0.conv", "no upsampler"),
        ("down_blocks.1.resnets.0.conv3", "resnet layer"),
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_qkv", "attention layer"),
        ("encoder_hid_proj", "not a layer"),
        ("time_embedding.cond_proj", "not a layer"),
        ("class_embedding.linear_1", "not a layer"),  # SDXL conditions through add_embedding
        ("down_blocks", "not a layer"),
        ("", "not a layer"),
    ],
)
def test_paths_without_an_ldm_name_are_refused(path, words):
    with pytest.raises(ValueError, match=words) as info:
        ldm_unet_path(path, SDXL_CONFIG)
    assert repr(path) in str(info.value)


def test_unets_of_another_layout_are_refused():
    with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
        ldm_unet_path("conv_in", dict(SDXL_CONFIG, down_block_types=("SimpleCrossAttnDownBlock2D",) * 3))
    with pytest.raises(ValueError, match="mid_block_type"):
        ldm_unet_path("conv_in", dict(SDXL_CONFIG, mid_block_type="UNetMidBlock2DSimpleCrossAttn"))
    with pytest.raises(ValueError, match="layers_per_block"):
        ldm_unet_path("conv_in", dict(SDXL_CONFIG, layers_per_block=(1, 2, 2)))
    assert ldm_unet_path("down_blocks.0.downsamplers.0.conv", dict(SDXL_CONFIG, layers_per_block=[1, 1, 1])) == (
        "input_blocks.2.0.op"
    )


# ---------------------------------------------------------------------------
# end to end: a kohya SDXL file diffusers loads reproduces the adapter
# ---------------------------------------------------------------------------


def build_tokenizer():
    """A byte-level CLIP tokenizer made in memory: every character is a token, no merges."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def build_sdxl_pipeline():
    """A tiny SDXL pipeline with random weights (the same weights on every call)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    text = CLIPTextConfig(
        hidden_size=TEXT_DIM, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        projection_dim=PROJ_DIM, max_position_embeddings=77, vocab_size=len(vocab) + 8,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    unet = build_unet(SDXL_2)
    vae = AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, sample_size=64, scaling_factor=0.13025,
    )
    text_encoder, text_encoder_2 = CLIPTextModel(text), CLIPTextModelWithProjection(text)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=scheduler, add_watermarker=False)


def generate(pipe) -> np.ndarray:
    return pipe(
        "a photo of a dog", num_inference_steps=2, height=64, width=64, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images[0]


def kohya_tensors(unet) -> dict[str, torch.Tensor]:
    """The adapter as kohya tensors under LDM names (down = lora_A, up = lora_B, alpha)."""
    out = {}
    for path, layer in unet.named_modules():
        if isinstance(layer, LoraLayer) and "default" in layer.lora_A:
            name = kohya_unet_key(path, unet.config, ldm=True)
            out[f"{name}.lora_down.weight"] = layer.lora_A["default"].weight.detach().clone()
            out[f"{name}.lora_up.weight"] = layer.lora_B["default"].weight.detach().clone()
            out[f"{name}.alpha"] = torch.tensor(float(layer.lora_alpha["default"]))
    return out


ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
SOME_RESNETS = [
    "down_blocks.0.resnets.0.conv1",
    "down_blocks.1.resnets.0.conv2",
    "mid_block.resnets.1.conv1",
    "up_blocks.0.resnets.2.conv2",
    "up_blocks.1.resnets.1.conv1",
]
FEED_FORWARD = ["ff.net.0.proj", "ff.net.2"]


@pytest.fixture(scope="module")
def base_image():
    return generate(build_sdxl_pipeline())


@pytest.mark.parametrize("targets", ["attention, ff and some resnet convs", "every linear and conv"])
def test_sdxl_file_under_ldm_names_reproduces_the_adapter(targets, base_image, tmp_path):
    pipe = build_sdxl_pipeline()
    if targets == "every linear and conv":
        target_modules = lora_layer_paths(pipe.unet)
    else:
        target_modules = ATTENTION + FEED_FORWARD + SOME_RESNETS
    torch.manual_seed(1)
    # init_lora_weights=False: lora_B is random rather than zero, so the adapter acts.
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=target_modules,
                                     init_lora_weights=False))
    adapted = generate(pipe)
    tensors = kohya_tensors(pipe.unet)
    if targets == "every linear and conv":
        assert len(tensors) == 3 * len(target_modules)
    else:
        assert any("_ff_net_0_proj." in k for k in tensors) and any("_in_layers_2." in k for k in tensors)
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.") for k in tensors)
    file = tmp_path / "lora.safetensors"
    save_file(tensors, str(file))

    fresh = build_sdxl_pipeline()
    fresh.load_lora_weights(str(file))
    loaded = generate(fresh)

    # every module of the file landed on the module it came from
    fresh_layers = {p for p, m in fresh.unet.named_modules() if isinstance(m, LoraLayer)}
    pipe_layers = {p for p, m in pipe.unet.named_modules() if isinstance(m, LoraLayer)}
    assert fresh_layers == pipe_layers
    assert np.abs(adapted - base_image).max() > 1e-3, "the LoRA should change the image"
    np.testing.assert_allclose(loaded, adapted, atol=1e-5)
