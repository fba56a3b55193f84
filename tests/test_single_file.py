"""Single-file (original LDM/sgm layout) checkpoints: written here, read back by diffusers' own reader.

Every tiny family is saved, loaded with ``from_single_file`` (offline, with
the tiny folder as config) and compared tensor by tensor and by a sampled
image. Real-sized layouts are checked on the meta device (no memory, no
download): key counts, family detection and diffusers' reader.
"""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from core.lora.single_file import SingleFileError, save_single_file, to_single_file_state_dict

FAMILIES = ("sd1", "sd2", "sdxl")
TEXT_PREFIXES = {
    "sd1": ("cond_stage_model.transformer.text_model.",),
    "sd2": ("cond_stage_model.model.",),
    "sdxl": ("conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."),
}


def _pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family.startswith("sdxl") else StableDiffusionPipeline


def _components(pipe) -> dict:
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if getattr(pipe, "text_encoder_2", None) else [])
    return {name: getattr(pipe, name) for name in names}


def _encoders(pipe) -> list:
    return [m for name, m in _components(pipe).items() if name.startswith("text_encoder")]


@pytest.fixture(scope="module")
def models(tiny_model, tiny_sd2, tiny_sdxl) -> dict[str, Path]:
    # (the tiny SDXL's second encoder is wider than its first, as in the real one: diffusers' reader tells
    # the two apart by width)
    return {"sd1": tiny_model, "sd2": tiny_sd2, "sdxl": tiny_sdxl}


@pytest.fixture(scope="module")
def pipes(models) -> dict:
    from core.quiet import quiet_local_loading

    quiet_local_loading()
    return {name: _pipeline_class(name).from_pretrained(folder) for name, folder in models.items()}


@pytest.fixture(scope="module")
def files(pipes, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Each model saved once in fp32 and once in fp16."""
    folder = tmp_path_factory.mktemp("single")
    out = {}
    for name, pipe in pipes.items():
        family = name
        for label, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            out[name, label] = save_single_file(folder / f"{name}-{label}.safetensors", pipe.unet, pipe.vae,
                                                _encoders(pipe), family, dtype=dtype, metadata={"made_by": "test"})
    return out


def _read_back(name: str, path: Path, folder: Path, pipe):
    """diffusers' ``from_single_file``, offline, configs from the tiny folder."""
    extra = {} if name.startswith("sdxl") else {"safety_checker": None, "requires_safety_checker": False}
    return _pipeline_class(name).from_single_file(str(path), config=str(folder), local_files_only=True,
                                                  torch_dtype=torch.float32, **extra)


def _image(pipe):
    return pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64,
                generator=torch.Generator().manual_seed(0), output_type="np").images


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_fp32_file_reads_back_exactly(name, models, pipes, files):
    pipe = pipes[name]
    back = _read_back(name, files[name, "fp32"], models[name], pipe)
    for component, module in _components(pipe).items():
        ours, theirs = module.state_dict(), getattr(back, component).state_dict()
        assert ours.keys() == theirs.keys(), component
        different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
        assert not different, f"{component}: {different[:5]}"
    # Same weights, same image; the modules diffusers builds from a single file may pick other CPU kernels
    # (attention implementation, memory layout), which move a pixel by ~1e-6 on some processors.
    np.testing.assert_allclose(_image(pipe), _image(back), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_fp16_file_holds_the_rounded_weights_in_half_the_bytes(name, models, pipes, files):
    pipe = pipes[name]
    back = _read_back(name, files[name, "fp16"], models[name], pipe)
    for component, module in _components(pipe).items():
        ours, theirs = module.state_dict(), getattr(back, component).state_dict()
        assert ours.keys() == theirs.keys(), component
        for key, tensor in ours.items():
            assert torch.equal(tensor.half().float(), theirs[key]), f"{component}.{key}"
            assert torch.allclose(tensor, theirs[key], rtol=1e-3, atol=1e-4), f"{component}.{key}"
    assert _data_bytes(files[name, "fp16"]) * 2 == _data_bytes(files[name, "fp32"])
    assert files[name, "fp16"].stat().st_size < 0.52 * files[name, "fp32"].stat().st_size


def _data_bytes(path: Path) -> int:
    """A .safetensors file's size without its JSON header (8-byte length, then the header)."""
    with open(path, "rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - header


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))


@pytest.mark.parametrize("family", FAMILIES)
def test_keys_are_the_original_layout_and_all_are_converted(family, pipes, files):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from safetensors.torch import load_file

    from core.base.checkpoints import checkpoint_family

    pipe, path = pipes[family], files[family, "fp32"]
    state = load_file(path)
    assert _header(path)["__metadata__"] == {"made_by": "test"}
    assert checkpoint_family(path) == family
    prefixes = ("model.diffusion_model.", "first_stage_model.") + TEXT_PREFIXES[family]
    assert all(k.startswith(prefixes) for k in state), [k for k in state if not k.startswith(prefixes)][:5]
    for prefix in prefixes:
        assert any(k.startswith(prefix) for k in state), prefix

    # diffusers' reader turns the file's keys back into exactly the model's keys, one for one
    for component, prefix, reader in (("unet", "model.diffusion_model.", convert_ldm_unet_checkpoint),
                                      ("vae", "first_stage_model.", convert_ldm_vae_checkpoint)):
        module = getattr(pipe, component)
        back = reader(state, dict(module.config))
        assert back.keys() == module.state_dict().keys(), component
        assert sum(k.startswith(prefix) for k in state) == len(back), component
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 convolutions, as in LDM

    encoders = _encoders(pipe)
    text_keys = {k for k in state if k.startswith(TEXT_PREFIXES[family])}
    if family != "sd2":  # transformers' names under the original prefix
        clip = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(state).items()}
        assert clip.keys() == encoders[0].state_dict().keys()
        assert len(clip) == sum(k.startswith(TEXT_PREFIXES[family][0]) for k in text_keys)
    if family != "sd1":
        encoder, prefix = encoders[-1], TEXT_PREFIXES[family][-1]
        open_clip = convert_open_clip_checkpoint(encoder, state, prefix=prefix)
        layers = encoder.config.num_hidden_layers
        expected = {("" if k.startswith("text_") else "text_model.") + k for k in encoder.state_dict()}
        extra = {f"text_model.encoder.layers.{layers}.{k}" for k in _layer_keys()} if family == "sd2" else set()
        assert open_clip.keys() == expected | extra
        packed = 12 * (layers + (family == "sd2")) + 4 + 1  # + text_projection (the identity for SD 2.x)
        assert sum(k.startswith(prefix) for k in text_keys) == packed


def _layer_keys() -> list[str]:
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "layer_norm1",
             "layer_norm2", "mlp.fc1", "mlp.fc2"]
    return [f"{n}.{kind}" for n in names for kind in ("weight", "bias")]


def test_sd2_extra_last_layer_is_the_identity(pipes, files):
    """Read with one more layer than diffusers' SD 2.x encoder has, the text states are unchanged."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    encoder = pipes["sd2"].text_encoder
    config = copy.deepcopy(encoder.config)
    config.num_hidden_layers += 1
    deeper = CLIPTextModel(config).eval()
    state = convert_open_clip_checkpoint(deeper, load_file(files["sd2", "fp32"]), prefix="cond_stage_model.model.")
    deeper.load_state_dict({k.removeprefix("text_model."): v for k, v in state.items()}, strict=True)
    ids = torch.tensor([[config.bos_token_id, 5, 6, 7, config.eos_token_id]])
    with torch.no_grad():
        assert torch.equal(deeper(ids).last_hidden_state, encoder(ids).last_hidden_state)


def _real_shaped(family: str):
    """UNet, VAE and text encoders with the real models' shapes, on the meta device (no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def clip(hidden, layers, heads, act, projection=False):
        config = CLIPTextConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                intermediate_size=4 * hidden, hidden_act=act, projection_dim=hidden)
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)

    with torch.device("meta"):
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2)
        clip_l = clip(768, 12, 12, "quick_gelu")
        if family == "sd1":
            return UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8), vae, [clip_l]
        if family == "sd2":  # OpenCLIP ViT-H without its last layer, as diffusers' SD 2.x has it
            unet = UNet2DConditionModel(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                        use_linear_projection=True)
            return unet, vae, [clip(1024, 23, 16, "gelu")]
        unet = UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
            attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
        return unet, vae, [clip_l, clip(1280, 32, 20, "gelu", projection=True)]


# Keys per component in the released checkpoints (SD 1.5, SD 2.1, SDXL base 1.0), less the ones
# diffusers' models do not have: CLIP's position_ids buffer, OpenCLIP's logit_scale, SD 2.x's text_projection.
REAL_KEYS = {
    "sd1": {"model.diffusion_model.": 686, "first_stage_model.": 248, "cond_stage_model.transformer.": 196},
    # SD 2.1's own file: 24 OpenCLIP blocks of 12 tensors, 4 around them, and text_projection
    "sd2": {"model.diffusion_model.": 686, "first_stage_model.": 248, "cond_stage_model.model.": 293},
    "sdxl": {"model.diffusion_model.": 1680, "first_stage_model.": 248, "conditioner.embedders.0.": 196,
             "conditioner.embedders.1.": 389},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_real_sized_layout_is_recognised_as_its_family(family):
    from diffusers.loaders.single_file_utils import (
        CHECKPOINT_KEY_NAMES,
        SD_2_TEXT_ENCODER_KEYS_TO_IGNORE,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        infer_diffusers_model_type,
    )

    unet, vae, encoders = _real_shaped(family)
    state = to_single_file_state_dict(unet, vae, encoders, family)
    assert {p: sum(k.startswith(p) for k in state) for p in REAL_KEYS[family]} == REAL_KEYS[family]
    assert len(state) == sum(REAL_KEYS[family].values())
    assert all(t.dtype == torch.float16 for t in state.values())

    # diffusers: the family, and the reader maps back to every weight with its shape
    assert infer_diffusers_model_type(state) == {"sd1": "v1", "sd2": "v2", "sdxl": "xl_base"}[family]
    for module, reader in ((unet, convert_ldm_unet_checkpoint), (vae, convert_ldm_vae_checkpoint)):
        back = reader(state, dict(module.config))
        assert {k: tuple(v.shape) for k, v in back.items()} == {
            k: tuple(v.shape) for k, v in module.state_dict().items()}

    # A1111 (sd_models_config.guess_model_config_from_state_dict) and ComfyUI's markers
    if family == "sd1":
        assert CHECKPOINT_KEY_NAMES["v1"] in state
        assert state["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].shape[1] == 768
    if family == "sd2":
        assert state["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3072, 1024)
        last = {k for k in state if ".resblocks.23." in k}
        assert last == set(SD_2_TEXT_ENCODER_KEYS_TO_IGNORE) - {"cond_stage_model.model.text_projection"}
        assert state["cond_stage_model.model.text_projection"].shape == (1024, 1024)
        assert not any(".resblocks.24." in k for k in state)
    if family == "sdxl":
        assert "conditioner.embedders.1.model.ln_final.weight" in state
        assert state["conditioner.embedders.1.model.text_projection"].shape == (1280, 1280)
        assert state["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)


def test_refuses_an_unfused_lora(pipes, tmp_path):
    from peft import LoraConfig

    pipe = pipes["sd1"]
    unet = copy.deepcopy(pipe.unet)
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(SingleFileError, match="fuse"):
        save_single_file(tmp_path / "x.safetensors", unet, pipe.vae, _encoders(pipe), "sd1")
    assert not list(tmp_path.iterdir())


def test_bad_arguments_are_explained(pipes, tmp_path):
    from core.base.families import FamilyError

    pipe = pipes["sdxl"]
    with pytest.raises(SingleFileError, match="2 text encoder"):
        to_single_file_state_dict(pipe.unet, pipe.vae, [pipe.text_encoder], "sdxl")
    with pytest.raises(FamilyError):
        to_single_file_state_dict(pipe.unet, pipe.vae, _encoders(pipe), "sd4")
    with pytest.raises(SingleFileError, match="transformer alone"):
        to_single_file_state_dict(pipe.unet, pipe.vae, _encoders(pipe), "sd3")
    with pytest.raises(SingleFileError, match="safetensors"):
        save_single_file(tmp_path / "x.ckpt", pipe.unet, pipe.vae, _encoders(pipe), "sdxl")
    with pytest.raises(SingleFileError, match="strings"):
        save_single_file(tmp_path / "x.safetensors", pipe.unet, pipe.vae, _encoders(pipe), "sdxl",
                         metadata={"steps": 3})
    with pytest.raises(SingleFileError, match="text_projection"):  # CLIP-L slot holds a model without one
        to_single_file_state_dict(pipe.unet, pipe.vae, [pipe.text_encoder_2, pipe.text_encoder_2], "sdxl")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_planner_reads_a_single_file_without_converting_it(family, files):
    """A single file not converted yet is planned with its family's reference shapes (read from its keys)."""
    from core.base.architecture import of_model, reference

    arch = of_model(str(files[family, "fp16"]))
    assert arch == reference(family) and arch.source.startswith("reference")
