"""The reference models' configs (``core/base/architectures/*.json``): read without building anything.

One file per family's reference model (sd1, sd2, sdxl, sd3 = SD 3.5 Large, flux = FLUX.1-dev, flux2 =
FLUX.2 [klein] 4B, zimage = Z-Image) and per variant (sd3-medium, flux-schnell, flux2-9b): the denoiser's
("unet" or "transformer"), text encoders', VAE's and, for the flow families, scheduler's configs.
"""

from __future__ import annotations

import json
from pathlib import Path

REFERENCE_DIR = Path(__file__).with_name("architectures")
# Reference models by name: a family's default, or a variant of it.
VARIANTS = {"sd3": "sd3", "sd3-medium": "sd3", "flux": "flux", "flux-schnell": "flux", "flux2": "flux2",
            "flux2-9b": "flux2", "zimage": "zimage"}


def reference_data(name: str) -> dict:
    return json.loads((REFERENCE_DIR / f"{name}.json").read_text(encoding="utf-8"))


def reference_config(name: str, part: str) -> dict:
    """One part's config ("transformer", "vae", ...) of a reference model."""
    return dict(reference_data(name)[part])
