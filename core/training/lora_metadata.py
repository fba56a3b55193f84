"""What a run's LoRA file says about its training: kohya's ``ss_*`` keys and the model spec, from the config."""

from __future__ import annotations

from core.config import TrainConfig


def lora_metadata(config: TrainConfig, step: int, data_info: dict, family: str = "sd1",
                  prediction_type: str = "epsilon", variant: str = "") -> dict[str, str]:
    from core.lora.lora_io import kohya_metadata

    return kohya_metadata(
        family=family,
        prediction_type=prediction_type,
        variant=variant,
        rank=config.lora.rank,
        alpha=config.lora.alpha,
        output_name=config.output.name,
        resolution=config.dataset.resolution,
        steps=step,
        learning_rate=config.train.learning_rate,
        base_model=config.model.path,
        train_text_encoder=config.lora.train_text_encoder,
        extra={
            "modelspec.trigger_phrase": config.output.trigger_phrase,
            "ss_seed": config.train.seed,
            **data_info,
            "ss_batch_size_per_device": config.train.batch_size,
            "ss_gradient_accumulation_steps": config.train.gradient_accumulation_steps,
            "ss_lr_scheduler": config.train.lr_scheduler,
            "ss_lr_scheduler_num_cycles": config.train.lr_scheduler_num_cycles,
            "ss_lr_scheduler_power": config.train.lr_scheduler_power,
            "ss_lr_warmup_steps": config.train.lr_warmup_steps,
            "ss_optimizer": optimizer_label(config),
            "ss_loraplus_lr_ratio": config.train.loraplus_lr_ratio,
            "ss_mixed_precision": config.train.mixed_precision,
            "ss_noise_offset": config.train.noise_offset,
            "ss_min_snr_gamma": config.train.min_snr_gamma,
            "ss_zero_terminal_snr": config.train.zero_terminal_snr,
            "ss_masked_loss": config.dataset.masked_loss,
            **({"ss_blocks": config.lora.blocks, "ss_block_dims": config.lora.block_ranks,
                "ss_block_lr_weights": config.lora.block_lr_weights}
               if config.lora.blocks or config.lora.block_ranks or config.lora.block_lr_weights else {}),
            "ss_prior_loss_weight": config.train.prior_loss_weight,
            "ss_max_token_length": config.dataset.max_token_length,
            "ss_random_crop": config.dataset.random_crop,
            "ss_color_jitter": config.dataset.color_jitter,
            "ss_hue_jitter": config.dataset.hue_jitter,
            "ss_timestep_sampling": config.train.timestep_sampling,
            "ss_clip_skip": config.model.clip_skip,
            "ss_tag_dropout": config.dataset.tag_dropout,
            "ss_keep_tokens": config.dataset.keep_tokens,
            "ss_min_timestep": config.train.min_timestep,
            "ss_max_timestep": config.train.max_timestep,
            "ss_loss_type": config.train.loss_type,
            "ss_huber_schedule": config.train.huber_schedule,
            "ss_huber_c": config.train.huber_c,
            "ss_debiased_estimation": config.train.debiased_estimation,
            "ss_multires_noise_iterations": config.train.multires_noise_iterations,
            "ss_multires_noise_discount": config.train.multires_noise_discount,
            "ss_ip_noise_gamma": config.train.ip_noise_gamma,
            "ss_logit_mean": config.train.logit_mean,
            "ss_logit_std": config.train.logit_std,
            "ss_mode_scale": config.train.mode_scale,
            **({"ss_discrete_flow_shift": config.train.flow_shift, "ss_weighting_scheme": config.train.loss_weighting,
                "ss_guidance_scale": config.train.guidance_scale} if family in ("flux", "sd3") else {}),
            **network_metadata(config, family),
            "ss_text_encoder_lr": config.lora.text_encoder_learning_rate or config.train.learning_rate,
            "ss_unet_lr": config.train.learning_rate,
        },
    )


def network_metadata(config: TrainConfig, family: str) -> dict[str, str]:
    """``ss_network_module`` and ``ss_network_args`` as sd-scripts writes them for the adapter kind: LoCon is
    its ``networks.lora`` with ``conv_dim``/``conv_alpha``; LoHa, LoKr and DoRA are LyCORIS' ``lycoris.kohya``
    with ``algo`` (and ``dora_wd``)."""
    import json

    lora = config.lora
    args = {"conv_dim": str(lora.conv_rank), "conv_alpha": f"{lora.conv_alpha:g}"} if lora.conv_rank else {}
    if lora.type in ("loha", "lokr") or lora.dora:
        algo = lora.type if lora.type in ("loha", "lokr") else "locon"  # LyCORIS' name for LoRA with convolutions
        args = {"algo": algo, **args, **({"factor": str(lora.lokr_factor)} if lora.type == "lokr" else {})}
        if lora.dora:  # LyCORIS' words for DoRA along the input axis
            args.update(dora_wd="True", wd_on_output="False")
        return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args)}
    return {"ss_network_args": json.dumps(args)} if args else {}


def optimizer_label(config: TrainConfig) -> str:
    """The optimizer with its settings, as sd-scripts writes ``ss_optimizer`` ("name(arg=value,...)")."""
    t = config.train
    args = {"prodigy": f"d_coef={t.prodigy_d_coef},safeguard_warmup={t.prodigy_safeguard_warmup},"
                       f"use_bias_correction=True",
            "adafactor": f"relative_step={t.adafactor_relative_step}"}.get(t.optimizer, "")
    return f"{t.optimizer}({args})" if args else t.optimizer
