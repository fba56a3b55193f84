"""The Dataset tab's Auto-caption box: captioner kinds, their models and options, and the background job."""

import json
import time
from pathlib import Path

import pytest

from core.captioning.caption_tagger import write_tiny_tagger
from tests.test_caption import noise
from ui import dataset_tab
from ui.runner import CaptionJob, option_args
from ui.settings import AppSettings


@pytest.fixture
def settings(tmp_path) -> AppSettings:
    s = AppSettings(tmp_path / "home")
    s.ensure()
    return s


def fake_transformers_folder(folder: Path, model_type: str) -> Path:
    """Only what the model list reads: a config.json with its model_type."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return folder


def test_each_captioner_lists_its_local_models_then_a_hub_id(settings):
    tagger = write_tiny_tagger(settings.models_dir / "tiny-wd14")
    blip = fake_transformers_folder(settings.models_dir / "my-captioner", "blip")
    florence = fake_transformers_folder(settings.models_dir / "f2", "florence2")
    fake_transformers_folder(settings.models_dir / "a-clip", "clip")
    (settings.models_dir / "tiny").mkdir()  # a diffusers model: no captioner
    assert dataset_tab.captioner_models(settings) == [str(blip), "Salesforce/blip-image-captioning-large"]
    assert dataset_tab.captioner_models(settings, "wd14") == [str(tagger), "SmilingWolf/wd-swinv2-tagger-v3"]
    assert dataset_tab.captioner_models(settings, "florence2") == [str(florence), "florence-community/Florence-2-large"]
    assert [name for _, name in dataset_tab.CAPTIONER_KINDS] == ["blip", "wd14", "florence2"]


def test_the_box_passes_only_the_chosen_captioners_options():
    form = {"threshold": 0.5, "character_threshold": 0.9, "exclude_tags": " solo, ^_^ ", "task": "caption"}
    assert dataset_tab.caption_options("wd14", form) == {"threshold": 0.5, "character_threshold": 0.9,
                                                         "exclude_tags": "solo, ^_^"}
    assert dataset_tab.caption_options("wd14", {**form, "exclude_tags": "  "})["exclude_tags"] is None
    assert dataset_tab.caption_options("florence2", form) == {"task": "caption"}
    assert dataset_tab.caption_options("blip", form) == {}
    assert option_args({"threshold": 0.5, "character_threshold": 0.9, "exclude_tags": None, "include_rating": True,
                        "task": False}) == ["--threshold", "0.5", "--character-threshold", "0.9", "--include-rating"]


def test_caption_job_runs_the_tagger_with_its_options(settings, tmp_path):
    tagger = write_tiny_tagger(settings.models_dir / "tiny-wd14")
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(3):
        noise(folder / f"img{i}.png", seed=i)
    (folder / "img0.txt").write_text("kept", encoding="utf-8")
    options = dataset_tab.caption_options("wd14", {"threshold": 0.6, "character_threshold": 0.9,
                                                   "exclude_tags": "long hair, ^_^"})
    job = CaptionJob(folder, str(tagger), settings.outputs_dir / ".app", captioner="wd14", prefix="sks",
                     options=options)
    assert job.process.args[-6:] == ["--threshold", "0.6", "--character-threshold", "0.9", "--exclude-tags",
                                     "long hair, ^_^"]
    job.process.wait(timeout=120)
    status = job.poll()
    assert status.finished and not status.error, job.log_tail()
    assert (status.written, status.skipped) == (2, 1)
    assert "Captioning done: wrote 2, kept 1" in status.text()
    assert (folder / "img0.txt").read_text(encoding="utf-8") == "kept"
    for name in ("img1.txt", "img2.txt"):
        tags = (folder / name).read_text(encoding="utf-8").split(", ")
        assert tags[0] == "sks" and not {"long hair", "^_^", "general"} & set(tags)


def test_a_caption_job_with_an_option_of_another_captioner_shows_the_error(settings, tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    noise(folder / "a.png")
    job = CaptionJob(folder, "Salesforce/blip-image-captioning-large", settings.outputs_dir / ".app",
                     captioner="blip", options={"threshold": 0.5})
    job.process.wait(timeout=120)
    text = job.poll().text()
    assert text.startswith("⚠️ captioning failed:") and "threshold" in text and "wd14" in text
    assert "--" not in text  # the app's words, not the command line's


def test_the_demo_writes_every_tiny_captioner_and_relative_model_paths_work(settings, tmp_path, monkeypatch):
    from ui.demo import make_demo

    message = make_demo(settings)
    assert "wrote the tiny demo tagger" in message and "Florence-2" in message
    for kind, folder in (("wd14", "tiny-wd14"), ("blip", "tiny-blip"), ("florence2", "tiny-florence2")):
        assert dataset_tab.captioner_models(settings, kind)[0] == str(settings.models_dir / folder)
    assert "tagger" not in make_demo(settings)
    # A path typed relative to the app's home (or to models/) is the folder the demo wrote, wherever the app
    # was started from; a hub id stays as typed.
    monkeypatch.chdir(tmp_path)
    for typed in ("models/tiny-blip", "tiny-blip", str(settings.models_dir / "tiny-blip")):
        assert settings.resolve(typed) == str((settings.models_dir / "tiny-blip").resolve())
    assert settings.resolve("Salesforce/blip-image-captioning-base") == "Salesforce/blip-image-captioning-base"
    (settings.datasets_dir / "pets").mkdir()
    noise(settings.datasets_dir / "pets" / "a.png")
    jobs = dataset_tab.CaptionJobs(settings)
    form = {"name": "pets", "folder": dataset_tab.TOP_LEVEL, "kind": "blip", "model": "models/tiny-blip",
            "prefix": "", "overwrite": False, "threshold": None, "character_threshold": None, "exclude_tags": "",
            "task": None}
    jobs.start(form)
    jobs.job.process.wait(timeout=300)
    assert jobs.job.poll().text().startswith("Captioning done: wrote 1"), jobs.job.poll().text()
    assert (settings.datasets_dir / "pets" / "a.txt").read_text(encoding="utf-8").strip()


def test_the_auto_caption_box_switches_captioner_and_starts_the_job(settings, tmp_path):
    """The real handlers of the built app, called as gradio calls them (no browser)."""
    from ui.app import build_app

    tagger = write_tiny_tagger(settings.models_dir / "tiny-wd14")
    dataset = settings.datasets_dir / "cats"
    dataset.mkdir()
    for i in range(2):
        noise(dataset / f"cat{i}.png", seed=i)
    app = build_app(settings)
    handlers = {fn.name: fn for fn in app.fns.values()}
    by_id = {block.elem_id: block for block in app.blocks.values() if getattr(block, "elem_id", None)}
    kind = by_id["dataset-captioner"]
    assert [value for _, value in kind.choices] == ["blip", "wd14", "florence2"] and kind.value == "blip"

    models, tagger_box, task = handlers["on_captioner"].fn("wd14")
    assert models["value"] == str(tagger) and tagger_box["visible"] and not task["visible"]
    models, tagger_box, task = handlers["on_captioner"].fn("florence2")
    assert models["value"] == "florence-community/Florence-2-large" and task["visible"]

    start = handlers["on_autocaption"]
    values = {block: block.value for block in start.inputs}
    values.update({by_id["dataset-name"]: "cats", kind: "wd14", by_id["dataset-captioner-model"]: str(tagger),
                   by_id["dataset-caption-prefix"]: "sks", by_id["dataset-tag-threshold"]: 0.5})
    message, _ = start.fn(values)
    assert message == "Loading the captioner…"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        progress = handlers["on_caption_tick"].fn("cats")[0]
        if "done" in progress or "failed" in progress:
            break
        time.sleep(0.2)
    assert "Captioning done: wrote 2" in progress, progress
    assert (dataset / "cat0.txt").read_text(encoding="utf-8").startswith("sks, ")
