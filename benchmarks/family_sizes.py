"""LoRA size per model family on the real architectures, and verify-lora's key coverage on them.

    python benchmarks/family_sizes.py [--rank 16]

Each family's reference model (SD 1.5, SD 2.1 768, SDXL 1.0, SD 3.5 Large and
Medium, FLUX.1-dev and schnell; core/base/architectures/) is built from its
real configs on the meta device (no weights, no download), peft adds the
family's default LoRA (lora.target_modules = [] and the text encoders' q/k/v/out
projections) as the engine does, only the LoRA weights get memory, the real
exporter writes the file's tensors (kohya's names; the original models' fused
names for SD 3.5 and FLUX), and verify-lora's name and shape check runs
against the model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

REFERENCES = ("sd1", "sd2", "sdxl", "sd3-medium", "sd3", "flux", "flux-schnell", "flux2", "zimage")


def adapted(name: str, rank: int):
    """(family, denoiser, text encoders) of a reference model with the engine's default LoRA, on meta; the
    LoRA weights alone on the CPU (small random values)."""
    from peft.tuners.lora import LoraLayer

    from core.base.architecture import build_meta, reference
    from core.base.families import get_family
    from core.base.text import TextEncoders
    from core.config import LoraConfig
    from core.training.memory import add_lora_meta

    arch = reference(name)
    family = get_family(arch.family)
    denoiser, encoders, _ = build_meta(arch)
    add_lora_meta(denoiser, family.lora_targets(denoiser, []), rank)
    text = TextEncoders(family, [None] * len(encoders), encoders, (77,) * len(encoders))  # no tokenizers needed
    for encoder in text.trainable():
        add_lora_meta(encoder, LoraConfig().text_encoder_target_modules, rank)
    gen = torch.Generator().manual_seed(0)
    for model in (denoiser, *text.trainable()):
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for factor in (module.lora_A["default"], module.lora_B["default"]):
                    factor.to_empty(device="cpu")
                    torch.nn.init.normal_(factor.weight, std=0.01, generator=gen)
    return family, denoiser, text


def main() -> int:
    from peft.tuners.lora import LoraLayer

    from core.lora.lora_io import kohya_state_dict
    from core.lora.verify import check_tensors, module_index, peft_index

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    print("| model | denoiser: layers with LoRA / parameters | file modules | text encoders: layers / parameters "
          "| verify-lora | sample key |")
    print("|---|---|---|---|---|---|")
    for name in REFERENCES:
        family, denoiser, text = adapted(name, args.rank)
        count = lambda m: (sum(isinstance(x, LoraLayer) for x in m.modules()),  # noqa: E731
                           sum(p.numel() for p in m.parameters() if p.requires_grad))
        layers, params = count(denoiser)
        text_counts = [count(e) for e in text.trainable()]
        tensors = kohya_state_dict(denoiser, text, dtype=torch.float16, family=family.name)
        index = module_index(denoiser, list(text.encoders), family)
        _, modules, unmatched, problems, matched = check_tensors(tensors, index,
                                                                 peft_index(denoiser, list(text.encoders), family))
        unet_key = sorted(k for k in tensors if k.startswith("lora_unet_"))[0].rsplit(".", 2)[0]
        print(f"| {name} | {layers} / {params:,} | {sum(k.startswith('lora_unet_') for k in tensors) // 3} | "
              f"{sum(c[0] for c in text_counts)} / {sum(c[1] for c in text_counts):,} | "
              f"{matched}/{modules} map, {len(unmatched)} unmatched, {len(problems)} problems | `{unet_key}` |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
