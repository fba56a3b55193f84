"""The offline demo: the demo model that learns (examples/demo-model) with a concept it never saw and a preset
to teach it, a tiny random-weight model, tiny captioners and a small captioned dataset."""

from __future__ import annotations

import shutil

from ui.settings import ROOT, TINY_MODEL_NAME, AppSettings

DEMO_MODEL_NAME = "demo-shapes"  # examples/demo-model, copied into the models folder
CONCEPT_DATASET = "zorp"  # magenta squares called "zorp": a colour demo-shapes never saw
CONCEPT_PICTURES = 12  # four on each background; the preset holds three out for validation
DEMO_PRESET = "demo zorp"
# Settings that teach demo-shapes the zorp colour in about a minute on a CPU (measured in tests/test_demo_model.py).
DEMO_SETTINGS = {
    "dataset": {"resolution": 64, "validation_split": 0.25},
    "lora": {"rank": 8, "alpha": 8.0},
    "train": {"max_train_steps": 200, "batch_size": 2, "learning_rate": 1e-3},
    "sample": {"prompts": ["a zorp square on a white background", "a zorp square on a black background",
                           "a zorp circle on a grey background", "a red circle on a white background"],
               "every_n_steps": 50, "steps": 12, "validation_timesteps": 8},
    "output": {"trigger_phrase": "zorp", "save_every_n_steps": 50},
}


def make_demo(settings: AppSettings) -> str:
    """Create what is missing of the demo (models/demo-shapes, datasets/zorp and the "demo zorp" preset;
    models/tiny, the tiny captioners and tagger, datasets/demo); say what was done."""
    from core.base.tiny import write_tiny_model

    done = _learning_demo(settings)
    model = settings.models_dir / TINY_MODEL_NAME
    if not (model / "model_index.json").is_file():
        write_tiny_model(model)
        done.append(f"wrote the tiny demo model to {model}")
    captioner = settings.models_dir / "tiny-blip"
    if not (captioner / "config.json").is_file():
        from core.captioning.caption_blip import write_tiny_blip

        write_tiny_blip(captioner)
        done.append(f"wrote the tiny demo captioner to {captioner}")
    florence = settings.models_dir / "tiny-florence2"
    if not (florence / "config.json").is_file():
        from core.captioning.caption_florence import write_tiny_florence2

        write_tiny_florence2(florence)
        done.append(f"wrote the tiny demo Florence-2 captioner to {florence}")
    tagger = settings.models_dir / "tiny-wd14"
    if not (tagger / "model.onnx").is_file():
        from core.captioning.caption_tagger import write_tiny_tagger

        write_tiny_tagger(tagger)
        done.append(f"wrote the tiny demo tagger to {tagger}")
    demo = settings.datasets_dir / "demo"
    if not demo.is_dir():
        demo.mkdir(parents=True)
        for path in sorted((ROOT / "examples" / "pictures").iterdir()):
            shutil.copyfile(path, demo / path.name)
        done.append(f"copied the demo pictures to {demo}")
    return "; ".join(done) or "the demo model and dataset are already there"


def demo_updates(settings: AppSettings) -> tuple:
    """The demo button: set up what is missing, then (message, Dataset picker, Train model, captioner kind,
    captioner model, preset picker) updates, with the demo model, its concept and its preset picked."""
    import gradio as gr

    from core.data import dataset_store
    from ui import dataset_tab
    from ui import presets as presets_mod
    from ui.settings import model_choices

    message = make_demo(settings)
    models = gr.update(choices=model_choices(settings.models_dir), value=str(settings.models_dir / DEMO_MODEL_NAME))
    names = gr.update(choices=dataset_store.list_datasets(settings.datasets_dir), value=CONCEPT_DATASET)
    captioners = gr.update(choices=dataset_tab.captioner_models(settings), value=str(settings.models_dir / "tiny-blip"))
    preset = gr.update(choices=presets_mod.list_presets(settings.presets_dir), value=DEMO_PRESET)
    return (f"Demo ready: {message}.\n\n**See a LoRA learn** (about a minute on a CPU): the `{DEMO_MODEL_NAME}` "
            f"model draws coloured shapes but has never seen the colour of the `{CONCEPT_DATASET}` dataset "
            f"(magenta squares called zorp). In the Train tab press **Apply preset** ('{DEMO_PRESET}' is picked), "
            "then **Train**: the samples of the zorp prompts turn magenta, the red circle stays red. Then type "
            "`a zorp square on a white background` in the Prompt tab and compare base and LoRA side by side.",
            names, models, "blip", captioners, preset)


def _learning_demo(settings: AppSettings) -> list[str]:
    """models/demo-shapes, datasets/zorp and the preset "demo zorp", those that are missing; what was done."""
    from core.base.demo_pictures import write_concept_dataset
    from core.fsutil import new_folder
    from ui.presets import save_preset

    done = []
    model = settings.models_dir / DEMO_MODEL_NAME
    if not (model / "model_index.json").is_file():
        with new_folder(model) as tmp:
            shutil.copytree(ROOT / "examples" / "demo-model", tmp, dirs_exist_ok=True)
        done.append(f"copied the demo model that learns to {model}")
    concept = settings.datasets_dir / CONCEPT_DATASET
    if not concept.is_dir():
        write_concept_dataset(concept, count=CONCEPT_PICTURES)
        done.append(f"drew the zorp pictures to {concept}")
    if not (settings.presets_dir / f"{DEMO_PRESET}.toml").is_file():
        save_preset(settings.presets_dir, DEMO_PRESET, DEMO_SETTINGS)
        done.append(f"saved the preset '{DEMO_PRESET}'")
    return done
