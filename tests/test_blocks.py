"""lora.blocks, lora.block_ranks, lora.block_lr_weights: blocks by the names people know."""

import pytest
import torch
from conftest import EventLog, tiny_config, write_dataset
from safetensors.torch import load_file

from core import config as config_mod
from core.base.families import get_family
from core.lora.blocks import BlockError, block_of, matches, module_of, parse_values


def test_sdxl_modules_get_a1111s_block_names():
    from core.base.architecture import build_meta, reference

    unet = build_meta(reference("sdxl"))[0]
    sdxl, config = get_family("sdxl"), unet.config
    for path, block in [("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "IN04"),
                        ("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k", "IN08"),
                        ("mid_block.attentions.0.transformer_blocks.0.attn1.to_q", "MID"),
                        ("up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_v", "OUT02"),
                        ("up_blocks.1.attentions.0.proj_in", "OUT03"),
                        ("down_blocks.0.resnets.1.conv1", "IN02"),
                        ("time_embedding.linear_1", None)]:
        assert block_of(sdxl, path, config) == block, path


def test_transformer_blocks_are_numbered_per_stack():
    for family, path, block in [("flux", "transformer_blocks.3.attn.to_q", "double.3"),
                                ("flux", "single_transformer_blocks.12.proj_mlp", "single.12"),
                                ("sd3", "transformer_blocks.0.attn.add_q_proj", "joint.0"),
                                ("zimage", "layers.5.attention.to_q", "layer.5"),
                                ("flux", "proj_out", None)]:
        assert block_of(get_family(family), path, None) == block, (family, path)


def test_names_ranges_and_patterns():
    assert matches("IN04-IN08", "IN05") and not matches("IN04-IN08", "IN09") and not matches("IN04-IN08", "OUT05")
    assert matches("single.0-9", "single.9") and not matches("single.0-9", "double.3")
    assert matches("double.*", "double.18") and matches("MID", "MID") and not matches("MID", "IN01")
    assert parse_values(["OUT00-OUT02=8", "single.* = 0.5"], "k") == [("OUT00-OUT02", 8.0), ("single.*", 0.5)]
    with pytest.raises(BlockError, match="BLOCKS=NUMBER"):
        parse_values(["MID"], "lora.block_ranks")
    assert module_of("up_blocks.0.attentions.1.proj_in.lora_A.default.weight") == "up_blocks.0.attentions.1.proj_in"
    assert module_of("transformer_blocks.0.attn.to_q.hada_w1_a.default") == "transformer_blocks.0.attn.to_q"
    assert module_of("mid_block.attentions.0.proj_in.lora_dora_scale.default") == "mid_block.attentions.0.proj_in"


def test_block_learning_rates_make_their_own_groups():
    from core.training.optimizers import param_groups

    a, b, c = (torch.nn.Parameter(torch.zeros(1)) for _ in range(3))
    named = {id(a): "down.lora_A.default.weight", id(b): "mid.lora_A.default.weight", id(c): "te.q_proj.lora_A"}
    cfg = config_mod.with_values(config_mod.TrainConfig(), {"train.learning_rate": 1e-4})
    groups = param_groups(cfg, [a, b], [c], named, lambda name: 0.5 if name.startswith("mid") else 1.0)
    assert sorted((g["lr"], len(g["params"])) for g in groups) == [(5e-5, 1), (1e-4, 1), (1e-4, 1)]


def test_a_run_trains_only_the_chosen_blocks_at_their_ranks(tiny_sdxl, tmp_path):
    from core.training import train

    cfg = tiny_config(tiny_sdxl, write_dataset(tmp_path / "d", n=2), tmp_path / "out", **{
        "lora.blocks": ["IN04-IN05", "MID"], "lora.block_ranks": ["MID=2"], "lora.block_lr_weights": ["IN05=0"],
        "train.max_train_steps": 2, "sample.prompts": [], "output.save_state": False,
        "output.save_precision": "fp32"})
    result = train.run(cfg, EventLog())
    tensors = load_file(str(result.lora_path))
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert modules and all(m.startswith(("lora_unet_input_blocks_4_", "lora_unet_middle_block_")) for m in modules)
    for key, tensor in tensors.items():
        if key.endswith("lora_down.weight"):
            assert tensor.shape[0] == (2 if "middle_block" in key else 4), key
        if key.endswith(".alpha") and "middle_block" in key:
            assert float(tensor) == pytest.approx(8.0 * 2 / 4)  # alpha / rank kept
    with pytest.raises(config_mod.ConfigError, match="names no block .* IN04"):
        train.run(tiny_config(tiny_sdxl, tmp_path / "d", tmp_path / "out2", **{"lora.blocks": ["IN11"]}),
                  EventLog())


def test_flow_blocks_select_their_layers():
    from core.base.tiny_flow import build_flux
    from core.lora.blocks import plan_blocks

    transformer = build_flux().transformer
    flux = get_family("flux")
    targets = flux.lora_targets(transformer, [])
    lora = config_mod.with_values(config_mod.TrainConfig(), {"lora.blocks": ["single.*"],
                                                             "lora.block_ranks": ["single.0=2"]}).lora
    plan = plan_blocks(flux, transformer, targets, lora)
    assert plan.paths and all(p.startswith("single_transformer_blocks.") for p in plan.paths)
    assert set(plan.ranks.values()) == {2} and all(p.startswith("single_transformer_blocks.0.") for p in plan.ranks)
