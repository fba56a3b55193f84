"""The adapter on the loaded model: the kind (lora.type, DoRA), its layers (targets, convolutions, blocks),
peft attaching it to the denoiser and the CLIP text encoders, and gradient checkpointing."""

from __future__ import annotations

import torch

from core.config import ConfigError, TrainConfig


def add_lora(config: TrainConfig, base) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Add peft LoRA adapters; return the trainable (fp32) parameters of the UNet and the text encoder."""
    from core.lora.adapters import add_adapter
    from core.lora.adapters import peft_config as adapter_config

    def attach(model, targets, what, key, conv=(), plan=None):
        lora = config.lora
        peft_config = adapter_config(lora.type, lora.rank, lora.alpha, list(targets), conv=conv,
                                     conv_rank=lora.conv_rank, conv_alpha=lora.conv_alpha, dropout=lora.dropout,
                                     lokr_factor=lora.lokr_factor, ranks=plan.ranks if plan else None,
                                     alphas=plan.alphas if plan else None)
        try:
            add_adapter(model, peft_config)
        except ValueError as exc:
            example = "to_q, to_k, to_v, to_out.0" if what == "UNet" else "q_proj, k_proj, v_proj, out_proj"
            raise ConfigError(f"{key} = {list(targets)!r}: {exc}. Use module names of the {what}, "
                              f"e.g. {example}") from None
        if lora.dora:
            from core.lora.dora import add_dora

            add_dora(model)
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        return params

    what = "UNet" if base.family.denoiser == "unet" else "transformer"
    targets = base.family.lora_targets(base.denoiser, config.lora.target_modules)
    if not targets:
        raise ConfigError(f"lora.target_modules = {config.lora.target_modules!r} matches no layer of the {what}'s "
                          f"blocks; leave it empty for the {base.family.label} default set")
    conv = []
    if config.lora.conv_rank:
        from core.lora.adapters import conv_targets

        conv = conv_targets(base.denoiser)
        if not conv:
            raise ConfigError(f"lora.conv_rank = {config.lora.conv_rank}: {base.family.label}'s {what} has no "
                              f"convolution layers to train; set it to 0")
    lora = config.lora
    if lora.blocks or lora.block_ranks or lora.block_lr_weights:
        from core.lora.blocks import BlockError, plan_blocks

        try:
            base.block_plan = plan_blocks(base.family, base.denoiser, list(targets) + list(conv), lora)
        except BlockError as exc:
            raise ConfigError(str(exc)) from None
        conv = [p for p in base.block_plan.paths if p in set(conv)]
        targets = [p for p in base.block_plan.paths if p not in set(conv)]
    unet_params = attach(base.denoiser, targets, what, "lora.target_modules", conv, base.block_plan)
    te_params = []
    if config.lora.train_text_encoder and not base.text.trainable():
        raise ConfigError(f"lora.train_text_encoder = true: {base.family.label}'s text encoder gets no LoRA (the "
                          f"other trainers train its transformer only); set it to false")
    if config.lora.train_text_encoder:
        for encoder in base.text.trainable():  # both of SDXL's; the CLIP ones, never T5
            te_params += attach(encoder, config.lora.text_encoder_target_modules, "text encoder",
                                "lora.text_encoder_target_modules")
        base.text.peft_config = base.text.trainable()[0].peft_config  # the resume state saves them as one
    if config.train.gradient_checkpointing:
        base.denoiser.enable_gradient_checkpointing()
        if config.lora.train_text_encoder:
            for encoder in base.text.trainable():
                encoder.gradient_checkpointing_enable()
    return unet_params, te_params
