"""Each flow family's conventions against its own diffusers pipeline.

The engine trains a velocity ``v = noise - latents`` on ``x = (1 - sigma) latents + sigma noise``. If the
family's text conditioning (``encode``), its call of the transformer (``predict``: time convention, sign,
packing, position ids) and its latent space are the pipeline's, then one Euler step of the pipeline from
``x`` at ``sigma_0`` lands exactly on ``x + (sigma_1 - sigma_0) v``. Checked for every flow family on its
tiny model, guidance off (SD 3.5 at 1, Z-Image at 0, FLUX.2 [klein] at 1) so one prediction makes the step.
"""

import pytest
import torch

FAMILIES = ["sd3", "flux", "zimage", "flux2"]


@pytest.fixture(scope="module")
def models(tiny_sd3, tiny_flux, tiny_zimage, tiny_flux2):
    return {"sd3": tiny_sd3, "flux": tiny_flux, "zimage": tiny_zimage, "flux2": tiny_flux2}


def _to_pipeline(name: str, latents: torch.Tensor) -> torch.Tensor:
    """Our latent layout (B, C, h, w) as the pipeline takes it (FLUX.1: packed already; FLUX.2 packs itself)."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    if name == "flux":
        return FluxPipeline._pack_latents(latents, b, c, h, w)
    return latents


def _from_pipeline(name: str, latents: torch.Tensor, shape) -> torch.Tensor:
    """The pipeline's latents while denoising (FLUX.1 and FLUX.2: a token sequence) in our layout."""
    b, c, h, w = shape
    if name == "flux":
        return latents.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(shape)
    if name == "flux2":
        return latents.transpose(1, 2).reshape(shape)
    return latents


@pytest.mark.parametrize("name", FAMILIES)
def test_one_pipeline_step_is_the_trained_velocity(name, models):
    from core.base.models import load_models
    from core.base.sample import load_pipeline

    model = models[name]
    pipe = load_pipeline(str(model), device="cpu", dtype=torch.float32)
    base = load_models(str(model), dtype=torch.float32)
    family, prompt = base.family, "a photo of sks dog"
    shape = (1, *family.latent_shape(base.vae.config, 64, 64))
    start = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    seen = {}

    def after_step(pipeline, step, timestep, kwargs):
        seen.setdefault("latents", kwargs["latents"].clone())
        return kwargs

    guidance = {"sd3": 1.0, "flux": 3.5, "zimage": 0.0, "flux2": 1.0}[name]
    kwargs = {"max_sequence_length": base.text.lengths[-1]} if name != "zimage" else {}
    pipe(prompt=prompt, num_inference_steps=2, guidance_scale=guidance, height=64, width=64,
         latents=_to_pipeline(name, start), output_type="latent", callback_on_step_end=after_step, **kwargs)
    sigmas = pipe.scheduler.sigmas
    stepped = _from_pipeline(name, seen["latents"], shape)

    hidden, second = base.text.encode([prompt])
    cond = {"hidden": hidden, "guidance": guidance}
    if family.variable_text:
        cond["lengths"] = second
    elif second is not None:
        cond["pooled"] = second
    with torch.no_grad():
        velocity = family.predict(base.denoiser, start, sigmas[:1], cond)
    ours = start + (sigmas[1] - sigmas[0]) * velocity
    torch.testing.assert_close(ours, stepped, atol=1e-5, rtol=1e-4)
    opposite = start - (sigmas[1] - sigmas[0]) * velocity  # the check can tell a wrong sign
    assert (opposite - stepped).abs().max() > 1e-3


def test_flux2_latents_are_the_pipelines_normalised_patches(models):
    """FLUX.2's training latents: the VAE's mean cut into 2x2 patches and normalised by its batch-norm
    statistics, as the pipeline encodes a picture."""
    from core.base.models import load_models
    from core.base.sample import load_pipeline
    from core.training.cache import encode_latent_distribution

    pipe = load_pipeline(str(models["flux2"]), device="cpu", dtype=torch.float32)
    base = load_models(str(models["flux2"]), dtype=torch.float32)
    assert base.vae.bn.running_mean.abs().max() > 0.1  # the tiny model's statistics are not the identity
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    dist = encode_latent_distribution(base.vae, pixels)
    ours = base.family.training_latents(base.vae, dist["mean"], dist["std"], None)
    theirs = pipe._encode_vae_image(pixels, generator=None)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert ours.shape == (1, *base.family.latent_shape(base.vae.config, 64, 64)) == (1, 128, 4, 4)
