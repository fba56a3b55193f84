"""LoRA size per model family on the real architectures, and verify-lora's key coverage on them.

    python benchmarks/family_sizes.py [--rank 16]

The UNets and text encoders are built from their real configs on the meta
device (no weights, no download, a few seconds), the default LoRA targets of
the config (UNet attention projections; text-encoder q/k/v/out projections)
are counted, a LoRA file's tensor names and shapes are laid out as the
exporter names them, and verify-lora's name and shape check runs against the
model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

UNETS = {
    "sd1": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    "sd2": dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True),
    "sdxl": dict(sample_size=128, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768)
TEXT = {
    "sd1": [CLIP_L],
    "sd2": [dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                 projection_dim=512, hidden_act="gelu")],
    "sdxl": [CLIP_L, dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                          projection_dim=1280, hidden_act="gelu")],
}


def build(family: str):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNETS[family])
        encoders = [CLIPTextModel(CLIPTextConfig(**TEXT[family][0]))]
        if family == "sdxl":
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**TEXT[family][1])))
    return unet, encoders


def lora_layout(module_index: dict, targets: list[str], prefix: str, rank: int) -> tuple[dict, int]:
    """Zero tensors named and shaped as the exporter writes them, for every targeted module."""
    tensors, params = {}, 0
    for name, module in module_index.items():
        if not name.startswith(prefix) or not any(name.endswith("_" + t.replace(".", "_")) for t in targets):
            continue
        fan_in, fan_out = module.in_features, module.out_features
        tensors[f"{name}.lora_down.weight"] = torch.zeros(rank, fan_in)
        tensors[f"{name}.lora_up.weight"] = torch.zeros(fan_out, rank)
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
        params += rank * (fan_in + fan_out)
    return tensors, params


def main() -> int:
    from core.base.families import FAMILIES
    from core.config import LoraConfig
    from core.lora.verify import check_tensors, module_index, peft_index

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    defaults = LoraConfig()
    for name, family in FAMILIES.items():
        unet, encoders = build(name)
        index = module_index(unet, encoders, family)
        unet_tensors, unet_params = lora_layout(index, defaults.target_modules, "lora_unet_", args.rank)
        text_tensors, text_params = {}, 0
        for prefix in family.kohya_text_prefixes:
            t, p = lora_layout(index, defaults.text_encoder_target_modules, prefix + "_", args.rank)
            text_tensors.update(t)
            text_params += p
        everything = {**unet_tensors, **text_tensors}
        _, modules, unmatched, problems, matched = check_tensors(everything, index, peft_index(unet, encoders, family))
        print(f"{family.label}: UNet {len(unet_tensors) // 3} modules, {unet_params:,} LoRA parameters; "
              f"text encoder(s) {len(text_tensors) // 3} modules, {text_params:,} parameters (rank {args.rank}); "
              f"verify-lora: {matched}/{modules} modules map, {len(unmatched)} unmatched, {len(problems)} problems; "
              f"sample keys: {sorted(unet_tensors)[0]}, {sorted(text_tensors)[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
