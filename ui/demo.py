"""The offline demo: a tiny random-weight model, tiny captioners and a small captioned dataset."""

from __future__ import annotations

import shutil

from ui.settings import ROOT, TINY_MODEL_NAME, AppSettings


def make_demo(settings: AppSettings) -> str:
    """Create models/tiny, the tiny captioner and tagger and datasets/demo if they are missing; say what was done."""
    from core.base.tiny import write_tiny_model

    done = []
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
