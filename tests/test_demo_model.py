"""The demo model that learns (core.base.demo_model): its pictures, the shipped examples/demo-model, a LoRA
trained on it with the project's own training, and the build command."""

import argparse
import json
import os
from pathlib import Path
from statistics import mean

import pytest

from core.base.demo_pictures import (
    BACKGROUNDS,
    COLOURS,
    CONCEPT_RGB,
    CONCEPT_WORD,
    JITTER,
    SHAPES,
    TEXTURES,
    colour_distance,
    draw_pictures,
    nearest_colour,
    write_concept_dataset,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "examples" / "demo-model"
SEEDS = (0, 1, 2)
SAMPLE_STEPS = 12
CONCEPT_PROMPTS = ["a zorp square on a white background", "a zorp square on a black background",
                   "a zorp circle on a grey background"]
LEAK_PROMPT = "a red circle on a white background"  # no trigger: the LoRA should leave it alone


def _cli(*args) -> int:
    """The demo commands on a parser of their own (core/cli.py registers the same add_command)."""
    from core.cli_demo import add_command

    parser = argparse.ArgumentParser(prog="python -m core")
    add_command(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args([str(a) for a in args])
    return parsed.func(parsed)


def _draw(pipe, prompt: str, seed: int):
    from core.base.sample import generate

    return generate(pipe, prompt, seed=seed, steps=SAMPLE_STEPS, width=64, height=64)


@pytest.fixture(scope="module")
def demo_pipe():
    from core.base.sample import load_pipeline

    return load_pipeline(str(DEMO_MODEL), device="cpu")


def test_pictures_show_what_their_captions_say_and_repeat_per_seed(tmp_path):
    pictures = draw_pictures(48, seed=3)
    for picture, caption in pictures:
        words = caption.replace(",", "").split()
        colour = words[1]
        assert colour in COLOURS and words[2] in SHAPES and words[5] in BACKGROUNDS, caption
        assert len(words) == 7 or words[7] in TEXTURES, caption
        assert nearest_colour(picture) == colour, caption
        assert colour_distance(picture, COLOURS[colour]) < JITTER * 3 ** 0.5 / 441 + 0.01, caption
    again = draw_pictures(48, seed=3)
    assert [c for _, c in again] == [c for _, c in pictures]
    assert all(a.tobytes() == b.tobytes() for (a, _), (b, _) in zip(again, pictures, strict=True))
    assert [c for _, c in draw_pictures(48, seed=4)] != [c for _, c in pictures]

    folder = write_concept_dataset(tmp_path / "zorp", count=6)
    from PIL import Image

    files = sorted(folder.glob("*.png"))
    assert len(files) == 6 and all(f.with_suffix(".txt").is_file() for f in files)
    for file in files:
        assert CONCEPT_WORD in file.with_suffix(".txt").read_text(encoding="utf-8")
        with Image.open(file) as picture:
            assert picture.size == (64, 64) and nearest_colour(picture) == CONCEPT_WORD


def test_shipped_model_loads_and_draws_the_colour_it_is_asked_for(demo_pipe):
    from core.base.models import load_models

    base = load_models(str(DEMO_MODEL))
    assert base.family.name == "sd1" and base.prediction_type == "epsilon" and base.vae_scale_factor == 4
    size = sum(f.stat().st_size for f in DEMO_MODEL.rglob("*") if f.is_file())
    assert size < 8e6, f"examples/demo-model is {size / 1e6:.1f} MB"
    for seed in SEEDS[:2]:
        red = _draw(demo_pipe, "a red circle on a white background", seed)
        blue = _draw(demo_pipe, "a blue circle on a white background", seed)
        assert colour_distance(red, COLOURS["red"]) < colour_distance(red, COLOURS["blue"]), seed
        assert colour_distance(blue, COLOURS["blue"]) < colour_distance(blue, COLOURS["red"]), seed


@pytest.fixture(scope="module")
def zorp_run(tmp_path_factory):
    """A LoRA trained on the zorp pictures with the app's "demo zorp" preset (ui.demo.DEMO_SETTINGS), as the
    app would: validation split, checkpoints, events.jsonl in the run folder."""
    import copy

    from core import config
    from core.events import jsonl_writer
    from core.training import train
    from ui.demo import CONCEPT_PICTURES, DEMO_SETTINGS

    root = tmp_path_factory.mktemp("zorp")
    raw = copy.deepcopy(DEMO_SETTINGS)
    raw["model"] = {"path": str(DEMO_MODEL)}
    raw["dataset"]["path"] = str(write_concept_dataset(root / "zorp", count=CONCEPT_PICTURES))
    raw["output"].update(dir=str(root / "out"), name="zorp")
    cfg = config.from_dict(raw)
    result = train.run(cfg, jsonl_writer(cfg.run_dir / "events.jsonl"))
    assert result.status == "completed"
    return cfg.run_dir, result.lora_path


def _concept(pipe, lora=None, scale=1.0) -> list[float]:
    """Distances of the zorp prompts' pictures from magenta (0 magenta .. 1), at every seed."""
    from core.lora.preview import apply_lora

    if lora:
        apply_lora(pipe, str(lora), scale)
    try:
        return [colour_distance(_draw(pipe, prompt, seed), CONCEPT_RGB) for prompt in CONCEPT_PROMPTS
                for seed in SEEDS]
    finally:
        if lora:
            pipe.unload_lora_weights()


def test_a_lora_trained_on_the_concept_draws_it_and_the_base_does_not(zorp_run, demo_pipe):
    _, lora = zorp_run
    base, learned = _concept(demo_pipe), _concept(demo_pipe, lora)
    print(f"zorp prompts, distance from magenta: base {mean(base):.3f} {base}, LoRA {mean(learned):.3f} {learned}")
    assert min(base) > 0.2, base  # the base never saw the colour: its zorp squares are not magenta
    assert mean(learned) < mean(base) - 0.1, (base, learned)
    assert sum(d < 0.2 for d in learned) >= len(learned) // 2, learned  # magenta, half of them at least
    # What the LoRA did not learn stays: a red circle is still red.
    from core.lora.preview import apply_lora

    apply_lora(demo_pipe, str(lora))
    try:
        assert all(nearest_colour(_draw(demo_pipe, LEAK_PROMPT, seed)) == "red" for seed in SEEDS)
    finally:
        demo_pipe.unload_lora_weights()
    if os.environ.get("UPDATE_SCREENSHOTS"):  # the README's picture of it
        _base_and_lora_picture(demo_pipe, lora).save(ROOT / "docs" / "screenshots" / "demo-zorp.png")


def _base_and_lora_picture(pipe, lora):
    """Base and LoRA side by side for the preset's sample prompts (seed 0), each with its distance from magenta."""
    from core.base.sample import draw_grid
    from core.lora.preview import apply_lora

    prompts = [*CONCEPT_PROMPTS, LEAK_PROMPT]
    rows = [[_draw(pipe, prompt, 0) for prompt in prompts]]
    apply_lora(pipe, str(lora))
    try:
        rows.append([_draw(pipe, prompt, 0) for prompt in prompts])
    finally:
        pipe.unload_lora_weights()
    notes = [[[f"{colour_distance(p, CONCEPT_RGB):.2f} from magenta"] for p in row] for row in rows]
    columns = [" ".join(p.split()[1:3]) + f" on {p.split()[5]}" for p in prompts]  # "zorp square on white"
    return draw_grid(rows, [["demo-shapes"], ["with the LoRA", "(demo zorp preset,", "200 steps)"]], columns,
                     notes, None, "The demo model before and after a LoRA on 12 magenta 'zorp' squares")


def test_the_recommendation_picks_a_checkpoint_that_learned_the_concept(zorp_run, demo_pipe):
    from core.events import ValidationLoss, read_typed
    from core.training.recommend import recommend

    run_dir, _ = zorp_run
    rec = recommend(run_dir, strengths=(0.5, 1.0), steps=SAMPLE_STEPS, checkpoints=2)
    # The preset's sample prompts split by the trigger: the zorp ones are judged, the red circle is for leakage.
    assert rec.settings["prompts"] == CONCEPT_PROMPTS and rec.settings["leak_prompts"] == [LEAK_PROMPT]
    assert rec.step > 0 and rec.strength > 0, rec.summary()
    files = sorted(run_dir.glob("zorp*.safetensors"))
    by_file = {f.name: mean(_concept(demo_pipe, f)) for f in files}
    base = mean(_concept(demo_pipe))
    picked = by_file[Path(rec.lora_path).name] if rec.strength == 1.0 else \
        mean(_concept(demo_pipe, rec.lora_path, rec.strength))
    print(f"recommended {Path(rec.lora_path).name} at {rec.strength}: {picked:.3f} from magenta; base {base:.3f}; "
          f"each file at 1.0: {by_file}")
    losses = {e.step: e.loss for e in read_typed(run_dir / "events.jsonl")[0]
              if isinstance(e, ValidationLoss) and not e.ema}
    assert losses[rec.step] < 0.8 * losses[0], losses  # the held-out pictures saw the LoRA learn
    assert picked < base - 0.08, (picked, base)  # and its pictures are more magenta than the base's
    assert picked < min(by_file.values()) + 0.1, (picked, by_file)  # near the best file by the colour measure


def test_build_command_writes_a_loadable_model(tmp_path, capsys):
    from core.base.models import load_models

    out = tmp_path / "demo"
    assert _cli("demo-model", out, "--steps", 3, "--seed", 1) == 0
    assert "wrote the demo model" in capsys.readouterr().out
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    base = load_models(str(out))
    assert base.denoiser.dtype == base.vae.dtype == base.text.encoders[0].dtype
    assert base.vae.config.scaling_factor > 0
    assert _cli("demo-model", out, "--steps", 3) == 2  # refuses a folder that is not empty
    assert "already exists" in capsys.readouterr().err
