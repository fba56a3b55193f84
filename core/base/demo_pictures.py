"""Procedurally drawn pictures for the demo model, and the measure that says what colour a picture shows.

The demo model (``core.base.demo_model``) learns from pictures drawn here: one shape (circle, square or
triangle) in one of four colours on a white, black or grey background, plain, striped or dotted, at
64 px, each with a caption that says exactly that::

    a red circle on a white background, striped

The *concept* the base never sees is a colour: ``zorp``, magenta (``CONCEPT_RGB``). ``write_concept_dataset``
draws magenta squares captioned "a zorp square on a ... background" for the demo dataset and the tests.

The measure of a picture is the colour of its centre: the per-channel median of the middle quarter
(a 16x16 box at 64 px; every shape covers it at least half), and ``colour_distance`` from that to a colour,
scaled to 0..1 (0: the same colour, 1: as far as black is from white). Stripes and dots are a darker shade
of the shape's colour on at most a third of it, so the median stays the shape's colour.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

# The shape colours of the base model's pictures (RGB). Nothing magenta among them: that is the concept.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "grey": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
TEXTURES = ("plain", "striped", "dotted")  # "plain" is not written in the caption

CONCEPT_WORD = "zorp"
CONCEPT_RGB = (220, 50, 210)  # magenta: at least 170 (of 441) from every colour in COLOURS
SIZE = 64
JITTER = 25  # how far a drawn colour may stray from its named value, per channel (names stay unambiguous)
_MAX_DISTANCE = math.dist((0, 0, 0), (255, 255, 255))


def caption_for(colour: str, shape: str, background: str, texture: str = "plain") -> str:
    """"a red circle on a white background, striped" (no texture word for plain shapes)."""
    text = f"a {colour} {shape} on a {background} background"
    return text if texture == "plain" else f"{text}, {texture}"


def draw_picture(rgb: tuple[int, int, int], shape: str, background: tuple[int, int, int],
                 texture: str = "plain", rng: random.Random | None = None, size: int = SIZE):
    """One RGB picture: the shape, roughly centred, covering the central quarter of the picture.

    ``rng`` moves and sizes the shape a little (the centre by up to 1/16 of the side, the radius between
    0.3 and 0.4 of it); without one, the shape is centred at radius 0.35.
    """
    from PIL import Image, ImageDraw

    cx = cy = size / 2
    radius = size * 0.35
    if rng is not None:
        jitter = size / 16
        cx, cy = cx + rng.uniform(-jitter, jitter), cy + rng.uniform(-jitter, jitter)
        radius = size * rng.uniform(0.3, 0.4)
    mask = Image.new("L", (size, size), 0)
    pen = ImageDraw.Draw(mask)
    if shape == "circle":
        pen.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    elif shape == "square":
        half = radius * 0.9
        pen.rectangle((cx - half, cy - half, cx + half, cy + half), fill=255)
    elif shape == "triangle":  # pointing up, centred on its centroid
        r = radius * 1.25
        pen.polygon([(cx + r * math.cos(a), cy - r * math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6,
                                                                            11 * math.pi / 6)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; use one of: {', '.join(SHAPES)}")
    fill = Image.new("RGB", (size, size), rgb)
    if texture != "plain":
        _texture(fill, rgb, texture, size)
    picture = Image.new("RGB", (size, size), background)
    picture.paste(fill, (0, 0), mask)
    return picture


def _texture(fill, rgb: tuple[int, int, int], texture: str, size: int) -> None:
    """Draw stripes or dots over ``fill`` in a darker shade of ``rgb`` (at most a third of its area)."""
    from PIL import ImageDraw

    dark = tuple(c // 2 for c in rgb)
    pen = ImageDraw.Draw(fill)
    period = size // 4  # coarse enough for the VAE's 4x smaller latents to keep
    if texture == "striped":  # diagonal bands, a quarter of the period wide
        for offset in range(-size, size, period):
            pen.line((offset, size, offset + size, 0), fill=dark, width=max(1, period // 4))
    elif texture == "dotted":
        dot = period / 5
        for y in range(period // 2, size, period):
            for x in range(period // 2, size, period):
                pen.ellipse((x - dot, y - dot, x + dot, y + dot), fill=dark)
    else:
        raise ValueError(f"unknown texture {texture!r}; use one of: {', '.join(TEXTURES)}")


def random_picture(rng: random.Random, size: int = SIZE):
    """(picture, caption) of a random colour, shape, background and texture.

    Each colour varies a little around its named value (up to ``JITTER`` per channel for the shape, a third
    of that for the background): a model that sees only four exact colours learns to snap every colour to the
    nearest of them, and a LoRA could then hardly teach it a new one."""
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    background, texture = rng.choice(list(BACKGROUNDS)), rng.choice(TEXTURES)
    rgb = _jitter(COLOURS[colour], JITTER, rng)
    picture = draw_picture(rgb, shape, _jitter(BACKGROUNDS[background], JITTER // 3, rng), texture, rng, size)
    return picture, caption_for(colour, shape, background, texture)


def _jitter(rgb: tuple[int, int, int], amount: int, rng: random.Random) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)


def draw_pictures(count: int, seed: int = 0, size: int = SIZE) -> list[tuple[object, str]]:
    """``count`` (picture, caption) pairs; the same seed draws the same pictures."""
    rng = random.Random(seed)
    return [random_picture(rng, size) for _ in range(count)]


def draw_any_colour(count: int, seed: int = 0, size: int = SIZE) -> list:
    """``count`` uncaptioned pictures of the same shapes and textures in any colour on any background, for the
    VAE: an autoencoder must encode whatever a LoRA is later trained on (as SD's VAE encodes any photo),
    while the UNet and its captions only ever see ``COLOURS``."""
    rng = random.Random(seed)

    def any_rgb() -> tuple[int, int, int]:
        return tuple(rng.randint(0, 255) for _ in range(3))

    return [draw_picture(any_rgb(), rng.choice(SHAPES), any_rgb(), rng.choice(TEXTURES), rng, size)
            for _ in range(count)]


def concept_caption(background: str, trigger: str = CONCEPT_WORD) -> str:
    return f"a {trigger} square on a {background} background"


def write_concept_dataset(folder: str | Path, count: int = 8, seed: int = 0, trigger: str = CONCEPT_WORD,
                          size: int = SIZE) -> Path:
    """Write ``count`` pictures of the concept the base model never saw: magenta (``CONCEPT_RGB``) squares on
    the three backgrounds in turn, as ``zorp 1.png`` + ``zorp 1.txt`` ("a zorp square on a white background").

    The folder is created if needed; files of the same names are overwritten. Returns the folder.
    """
    from core.fsutil import save_image, write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(BACKGROUNDS)
    for i in range(count):
        background = names[i % len(names)]
        picture = draw_picture(CONCEPT_RGB, "square", BACKGROUNDS[background], "plain", rng, size)
        stem = f"{trigger} {i + 1}"
        save_image(folder / f"{stem}.png", picture)
        write_text(folder / f"{stem}.txt", concept_caption(background, trigger))
    return folder


def central_colour(picture) -> tuple[float, float, float]:
    """The per-channel median colour of the picture's middle quarter (a 16x16 box at 64 px)."""
    import numpy as np

    pixels = np.asarray(picture.convert("RGB"), dtype=np.float64)
    h, w = pixels.shape[:2]
    box = pixels[3 * h // 8: 5 * h // 8, 3 * w // 8: 5 * w // 8].reshape(-1, 3)
    return tuple(float(v) for v in np.median(box, axis=0))


def colour_distance(picture, rgb: tuple[int, int, int]) -> float:
    """How far the picture's central colour is from ``rgb``: 0 the same, 1 as far as black from white."""
    return math.dist(central_colour(picture), rgb) / _MAX_DISTANCE


def nearest_colour(picture, colours: dict[str, tuple[int, int, int]] | None = None) -> str:
    """The name of the colour (of ``colours``, default COLOURS plus the concept) nearest the picture's centre."""
    colours = colours or {**COLOURS, CONCEPT_WORD: CONCEPT_RGB}
    centre = central_colour(picture)
    return min(colours, key=lambda name: math.dist(centre, colours[name]))
