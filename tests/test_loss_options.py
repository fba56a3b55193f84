"""Loss types, Huber schedules, debiased estimation, pyramid noise, input perturbation and the timestep range."""

import math

import pytest
import torch
from conftest import EventLog, tiny_config, write_dataset

from core import config as config_mod
from core.training import loss_options as lo
from core.training import train


def _config(**values):
    return config_mod.with_values(config_mod.TrainConfig(), values)


def test_loss_types_against_hand_computed_values():
    pred, target = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    c = torch.tensor([0.5])
    assert lo.per_example(pred, target).item() == pytest.approx(9 / 2)
    huber = 2 * 0.5 * (math.sqrt(9 + 0.25) - 0.5)  # the zero element adds 0
    assert lo.per_example(pred, target, "huber", c).item() == pytest.approx(huber / 2)
    assert lo.per_example(pred, target, "smooth_l1", c).item() == pytest.approx(2 * (math.sqrt(9.25) - 0.5) / 2)
    # quadratic near zero, linear far out: a large error pulls less than with l2
    big = torch.tensor([[100.0]])
    assert lo.per_example(big, torch.zeros(1, 1), "huber", c).item() < 100


def test_huber_schedules_and_debiased_weight():
    ratio, time = torch.tensor([0.0, 1.0, 1000.0]), torch.tensor([0.0, 500.0, 1000.0])
    snr = lo.huber_c(_config(**{"train.huber_c": 0.1}), ratio, time)
    assert snr.tolist() == pytest.approx([1.0, 0.9 / 4 + 0.1, 0.9 / 1001 ** 2 + 0.1])
    exp = lo.huber_c(_config(**{"train.huber_schedule": "exponential", "train.huber_c": 0.1}), ratio, time)
    assert exp.tolist() == pytest.approx([1.0, math.sqrt(0.1), 0.1])
    const = lo.huber_c(_config(**{"train.huber_schedule": "constant", "train.huber_c": 0.3}), ratio, time)
    assert const.tolist() == pytest.approx([0.3] * 3)
    # 1/sqrt(SNR) with SNR = 1/ratio^2 (capped at 1000)
    assert lo.debiased_weight(torch.tensor([0.5, 2.0, 1e-6])).tolist() == pytest.approx(
        [0.5, 2.0, 1 / math.sqrt(1000)])
    assert lo.flow_noise_ratio(torch.tensor([0.5])).item() == pytest.approx(1.0)


def test_pyramid_noise_and_input_perturbation():
    latents = torch.zeros(2, 4, 16, 16)
    plain, _ = lo.step_noise(_config(), latents, torch.Generator().manual_seed(0))
    pyramid, same = lo.step_noise(_config(**{"train.multires_noise_iterations": 6,
                                             "train.multires_noise_discount": 0.8}), latents,
                                  torch.Generator().manual_seed(0))
    assert same is pyramid and pyramid.shape == latents.shape and pyramid.std().item() == pytest.approx(1.0)
    assert not torch.allclose(pyramid, plain)
    # low frequencies: neighbouring values agree more than in white noise
    corr = lambda n: torch.corrcoef(torch.stack([n[..., :-1].flatten(), n[..., 1:].flatten()]))[0, 1]  # noqa: E731
    assert corr(pyramid) > corr(plain) + 0.1
    target, model_input = lo.step_noise(_config(**{"train.ip_noise_gamma": 0.1}), latents,
                                        torch.Generator().manual_seed(0))
    torch.testing.assert_close(target, plain)  # the target's noise is untouched
    assert 0.05 < (model_input - target).std().item() < 0.15  # the input gets gamma = 0.1 more


def test_timestep_range_is_respected(tiny_model, tmp_path):
    from accelerate import Accelerator

    from core.training import objective

    cfg = tiny_config(tiny_model, write_dataset(tmp_path / "d", n=1), tmp_path / "o",
                      **{"train.min_timestep": 200, "train.max_timestep": 300})
    base = train.load_base(cfg, Accelerator(cpu=True), EventLog())
    drawn = []
    real = objective.diffusion_loss

    def spy(*args, **kwargs):
        drawn.append(args[5])
        return real(*args, **kwargs)

    objective.diffusion_loss = spy
    try:
        batch = {"pixels": torch.zeros(4, 3, 64, 64), "caption": ["a photo"] * 4}
        for seed in range(5):
            objective.training_loss(cfg, base, base.denoiser, base.text, batch, torch.Generator().manual_seed(seed),
                                    "cpu")
    finally:
        objective.diffusion_loss = real
    steps = torch.cat(drawn)
    assert steps.min() >= 200 and steps.max() < 300 and len(set(steps.tolist())) > 5
    with pytest.raises(config_mod.ConfigError, match="min_timestep"):
        tiny_config(tiny_model, tmp_path, tmp_path, **{"train.min_timestep": 500, "train.max_timestep": 400})


@pytest.mark.parametrize("model", ["sd1", "flux"])
def test_the_options_train_together(model, tiny_model, tiny_flux, tmp_path):
    """Huber with its schedule, debiased weights, pyramid noise, input perturbation and a timestep range: the
    run completes, the loss is finite and the file records them."""
    from safetensors import safe_open

    path = {"sd1": tiny_model, "flux": tiny_flux}[model]
    cfg = tiny_config(path, write_dataset(tmp_path / "d", n=2), tmp_path / "out", **{
        "train.loss_type": "huber", "train.debiased_estimation": True, "train.multires_noise_iterations": 4,
        "train.ip_noise_gamma": 0.1, "train.min_timestep": 100, "train.max_timestep": 900,
        "train.max_train_steps": 2, "sample.prompts": [], "output.save_state": False,
        "dataset.validation_split": 0.0})
    log = EventLog()
    result = train.run(cfg, log)
    losses = [e.loss for e in log.of("progress")]
    assert result.status == "completed" and losses and all(math.isfinite(x) for x in losses)
    with safe_open(result.lora_path, "pt") as f:
        meta = f.metadata()
    assert (meta["ss_loss_type"], meta["ss_huber_schedule"], meta["ss_debiased_estimation"]) == (
        "huber", "snr", "True")
    assert (meta["ss_multires_noise_iterations"], meta["ss_ip_noise_gamma"]) == ("4", "0.1")
    assert (meta["ss_min_timestep"], meta["ss_max_timestep"]) == ("100", "900")


def test_zero_terminal_snr_makes_the_last_step_pure_noise(tiny_model, tiny_sd2, tmp_path):
    """v-prediction only; the training schedule's last step is noise alone, and the samples start there."""
    from accelerate import Accelerator

    from core.base.sample import pipeline_from_parts

    data = write_dataset(tmp_path / "d", n=1)
    cfg = tiny_config(tiny_sd2, data, tmp_path / "o", **{"train.zero_terminal_snr": True})
    plain = train.load_base(tiny_config(tiny_sd2, data, tmp_path / "o"), Accelerator(cpu=True), EventLog())
    base = train.load_base(cfg, Accelerator(cpu=True), EventLog())
    assert plain.noise_scheduler.alphas_cumprod[-1] > 1e-3  # the usual schedule leaves signal at t = 999
    assert base.noise_scheduler.alphas_cumprod[-1] < 1e-6
    latents, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    last = torch.tensor([999])
    assert torch.allclose(base.noise_scheduler.add_noise(latents, noise, last), noise, atol=1e-2)
    assert not torch.allclose(plain.noise_scheduler.add_noise(latents, noise, last), noise, atol=1e-2)
    pipe = pipeline_from_parts(base.path, base.vae, base.text, base.denoiser, zero_snr=True)
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.config.rescale_betas_zero_snr and int(pipe.scheduler.timesteps[0]) == 999
    with pytest.raises(config_mod.ConfigError, match="v-prediction"):
        train.load_base(tiny_config(tiny_model, data, tmp_path / "o", **{"train.zero_terminal_snr": True}),
                        Accelerator(cpu=True), EventLog())
    cfg = tiny_config(tiny_sd2, data, tmp_path / "out", **{
        "train.zero_terminal_snr": True, "train.max_train_steps": 2, "sample.every_n_steps": 2,
        "output.save_state": False, "dataset.validation_split": 0.0})
    log = EventLog()
    result = train.run(cfg, log)
    assert result.status == "completed" and log.of("sample")
    assert all(math.isfinite(e.loss) for e in log.of("progress"))
