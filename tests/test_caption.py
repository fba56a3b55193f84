"""Automatic captioning: the tiny BLIP, caption_folder, and `python -m core caption` as the app runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.captioning import caption, caption_blip
from core.captioning.caption import CaptionError, caption_folder
from core.events import read_events
from tests.conftest import EventLog, sigterm_once

ROOT = Path(__file__).resolve().parents[1]
ODD_NAME = "mon chat été.png"  # spaces and non-ASCII


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory) -> Path:
    """A tiny random-weight BLIP captioner folder, built once per session."""
    return caption_blip.write_tiny_blip(tmp_path_factory.mktemp("captioners") / "tiny-blip")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model runs many small ops: on a busy 2-core machine, torch's thread pool makes them 100x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def noise(path: Path, size=(48, 40), seed=0) -> Path:
    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype("uint8")
    Image.fromarray(pixels).save(path)
    return path


def odd_folder(folder: Path) -> Path:
    """3 plain PNGs, one already captioned, one truncated, a CMYK JPEG and an odd name."""
    folder.mkdir(parents=True)
    for i, name in enumerate(["a.png", "b.png", "c.png", "captioned.png", ODD_NAME]):
        noise(folder / name, seed=i)
    (folder / "captioned.txt").write_text("an old caption", encoding="utf-8")
    whole = noise(folder / "broken.png", size=(64, 64), seed=9).read_bytes()
    (folder / "broken.png").write_bytes(whole[: len(whole) // 2])
    Image.new("CMYK", (40, 30), (0, 200, 200, 0)).save(folder / "cmyk.jpg")
    return folder


def subprocess_env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def core_cmd(*args, **kwargs):
    env = subprocess_env()
    return subprocess.run([sys.executable, "-m", "core", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, **kwargs)


# --------------------------------------------------------------------------
# the tiny BLIP and the captioner


def test_tiny_blip_loads_with_transformers_and_captions(tiny_blip):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(tiny_blip)
    model = BlipForConditionalGeneration.from_pretrained(tiny_blip)
    tokenizer, text = processor.tokenizer, model.config.text_config
    # generate() starts from bos and stops at sep: they must be the tokenizer's [DEC] and [SEP].
    assert (text.bos_token_id, text.sep_token_id, text.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
    assert tokenizer.bos_token == "[DEC]" and len(tokenizer) == text.vocab_size
    assert processor.image_processor.size == {"height": 32, "width": 32}

    captioner = caption_blip.BlipCaptioner(str(tiny_blip), device="cpu")
    pictures = [Image.new("RGB", (50, 30), colour) for colour in ("red", "white", "navy")]
    texts = captioner.caption(pictures, max_new_tokens=8)
    assert len(texts) == 3
    assert all(t and t == t.strip() and "\n" not in t and "[" not in t for t in texts), texts
    captioner.close()
    with pytest.raises(CaptionError, match="closed"):
        captioner.caption(pictures)
    with pytest.raises(FileExistsError, match="not an empty folder"):
        caption_blip.write_tiny_blip(tiny_blip)


def test_a_hub_model_that_is_not_cached_offline_says_how_to_download_it():
    with pytest.raises(CaptionError, match="HF_HUB_OFFLINE") as info:
        caption_blip.BlipCaptioner("example-org/no-such-blip-captioner", device="cpu")
    assert "hf download example-org/no-such-blip-captioner --local-dir models/" in str(info.value)
    assert info.value.kind == "model"


def test_a_folder_that_is_not_a_blip_captioner_is_refused(tmp_path, tiny_blip):
    config = json.loads((tiny_blip / "config.json").read_text())
    folder = tmp_path / "vqa"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["BlipForQuestionAnswering"]}))
    with pytest.raises(CaptionError, match="does not write captions"):
        caption_blip.BlipCaptioner(str(folder), device="cpu")
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "clip"}))
    with pytest.raises(CaptionError, match="not BLIP"):
        caption_blip.BlipCaptioner(str(folder), device="cpu")


# --------------------------------------------------------------------------
# caption_folder


def test_caption_folder_captions_what_it_can_and_reports_the_rest(tmp_path, tiny_blip):
    folder = odd_folder(tmp_path / "pics")
    log = EventLog()
    report = caption_folder(folder, "blip", model=str(tiny_blip), prefix="sks", batch_size=2, emit=log,
                            device="cpu")

    readable = ["a.png", "b.png", "c.png", "cmyk.jpg", ODD_NAME]
    assert sorted(report.written) == sorted(readable)
    assert report.skipped == ["captioned.png"]
    assert [name for name, _ in report.failed] == ["broken.png"]
    assert "truncated" in report.failed[0][1] or "damaged" in report.failed[0][1], report.failed
    for name in readable:
        text = (folder / name).with_suffix(".txt").read_bytes().decode("utf-8")
        assert text.startswith("sks, ") and len(text) > 5 and "\n" not in text and text == text.strip()
        assert not text.startswith("sks, sks")
    assert (folder / "captioned.txt").read_text(encoding="utf-8") == "an old caption"
    assert not (folder / "broken.txt").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary files left

    # Events: loading first, one progress per image it worked on (failures included), then the summary.
    assert [e.type for e in log.events][:2] == ["message", "phase"] and log.events[1].name == "loading captioner"
    progress = log.of("caption_progress")
    assert [(e.done, e.total) for e in progress] == [(i, 6) for i in range(1, 7)]
    assert sorted(e.image for e in progress) == sorted([*readable, "broken.png"])
    assert [e.image for e in progress if e.error] == ["broken.png"]
    (finished,) = log.of("caption_finished")
    assert finished.written == report.written and finished.failed == report.failed and not finished.stopped
    assert log.events[-1] is finished
    line = json.loads(progress[0].to_json())
    assert line["type"] == "caption_progress" and line["caption"] == progress[0].caption

    again = caption_folder(folder, model=str(tiny_blip), prefix="sks", overwrite=True, emit=EventLog(),
                           device="cpu")
    assert sorted(again.written) == sorted([*readable, "captioned.png"]) and again.skipped == []
    assert (folder / "captioned.txt").read_text(encoding="utf-8").startswith("sks, ")


def test_should_stop_ends_the_job_after_the_current_batch(tmp_path, tiny_blip):
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(5):
        noise(folder / f"img{i}.png", seed=i)
    log = EventLog()
    report = caption_folder(folder, model=str(tiny_blip), batch_size=2, emit=log, device="cpu",
                            should_stop=lambda: bool(log.of("caption_progress")))
    assert len(report.written) == 2
    assert len(list(folder.glob("*.txt"))) == 2
    assert log.events[-1].type == "caption_finished" and log.events[-1].stopped


def test_bad_input_fails_before_any_work(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    noise(folder / "a.png")
    with pytest.raises(CaptionError, match="unknown captioner 'wd99'") as info:
        caption_folder(folder, captioner="wd99")
    assert info.value.kind == "config"
    with pytest.raises(CaptionError, match="does not exist") as info:
        caption_folder(tmp_path / "missing", model="x")
    assert info.value.kind == "dataset"
    with pytest.raises(CaptionError, match="no captioner model folder") as info:
        caption_folder(folder, model=str(tmp_path / "no-model"))
    assert info.value.kind == "model"
    with pytest.raises(CaptionError, match="batch size"):
        caption_folder(folder, batch_size=0)
    assert not list(folder.glob("*.txt"))


def test_nothing_to_caption_loads_no_model(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    noise(folder / "a.png")
    (folder / "a.txt").write_text("done already")
    log = EventLog()
    # A hub id that is not cached would fail to load: it is never tried.
    report = caption_folder(folder, model="example-org/never-loaded", emit=log)
    assert report.skipped == ["a.png"] and report.written == [] and not log.of("phase")
    assert log.events[-1].type == "caption_finished"


@pytest.mark.parametrize("text, prefix, expected", [
    ("a dog on a sofa", "sks", "sks, a dog on a sofa"),
    ("sks dog on a sofa", "sks", "sks dog on a sofa"),
    ("SKS, dog", "sks", "SKS, dog"),
    ("sksdog on a sofa", "sks", "sks, sksdog on a sofa"),
    ("a dog", "", "a dog"),
])
def test_the_trigger_word_goes_first_once(text, prefix, expected):
    assert caption.with_prefix(text, prefix) == expected


def test_captions_are_cleaned_to_one_line():
    assert caption.clean_caption("  a dog\n on\ta  sofa \r\n") == "a dog on a sofa"


def test_two_images_that_would_share_a_caption_file_are_not_both_captioned(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    noise(folder / "a.png")
    noise(folder / "a.jpg")
    (folder / "a.txt").write_text("kept")
    report = caption_folder(folder, model="example-org/never-loaded")
    assert report.skipped == ["a.jpg"] and [name for name, _ in report.failed] == ["a.png"]


# --------------------------------------------------------------------------
# the command line


def test_caption_command_writes_captions_and_events(tmp_path, tiny_blip, capsys):
    folder = tmp_path / "pics"
    folder.mkdir()
    for i, name in enumerate(["a.png", "b.png", ODD_NAME]):
        noise(folder / name, seed=i)
    events_file = tmp_path / "events" / "caption.jsonl"
    out = core_cmd("caption", folder, "--captioner", "blip", "--model", tiny_blip, "--prefix", "sks",
                   "--events", events_file, "--batch-size", "2", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    for name in ["a.png", "b.png", ODD_NAME]:
        assert (folder / name).with_suffix(".txt").read_text(encoding="utf-8").startswith("sks, ")
    assert f"3/3 {ODD_NAME}: sks, " in out.stderr or f"/3 {ODD_NAME}: sks, " in out.stderr
    assert "Loading weights" not in out.stderr  # no library progress bars among the job's lines
    events, _ = read_events(events_file)
    types = [e["type"] for e in events]
    assert types == ["phase", "caption_progress", "caption_progress", "caption_progress", "caption_finished"]
    assert sorted(events[-1]["written"]) == sorted(["a.png", "b.png", ODD_NAME])
    assert events[-1]["stopped"] is False

    from core.cli import main  # the refusal in this process: the same code, without another interpreter start

    capsys.readouterr()
    assert main(["caption", str(folder), "--model", str(tmp_path / "no-such-model"), "--overwrite", "--events",
                 str(events_file)]) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("error:") == 1 and stderr.startswith("error: ")
    assert len(stderr.strip().splitlines()) == 1, stderr
    events, _ = read_events(events_file)
    assert events[-1]["type"] == "error" and "no-such-model" in events[-1]["message"]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM kills at once on Windows")
def test_tiny_captioner_command_and_sigterm_stops_after_the_batch(tmp_path):
    from core.cli import main

    assert main(["tiny-captioner", str(tmp_path / "tiny")]) == 0
    assert (tmp_path / "tiny" / "model.safetensors").is_file()
    assert main(["tiny-captioner", str(tmp_path / "tiny")]) == 2

    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(60):
        noise(folder / f"img{i:02d}.png", size=(8, 8), seed=i)
    events_file = tmp_path / "caption.jsonl"
    env = subprocess_env()
    proc = subprocess.Popen([sys.executable, "-m", "core", "caption", str(folder), "--model", str(tmp_path / "tiny"),
                             "--batch-size", "1", "--events", str(events_file), "--device", "cpu"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err, events = sigterm_once(proc, events_file,
                               lambda events: any(e["type"] == "caption_progress" for e in events), timeout=120,
                               poll=0.02)
    finished = events[-1]
    assert finished["type"] == "caption_finished" and finished["stopped"] is True, err
    assert 1 <= len(finished["written"]) < 60
    assert len(list(folder.glob("*.txt"))) == len(finished["written"])


@pytest.mark.cuda
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs an NVIDIA GPU")
def test_captioner_runs_in_fp16_on_the_gpu_and_frees_it(tiny_blip):
    import torch

    captioner = caption_blip.BlipCaptioner(str(tiny_blip))  # no device: the GPU is picked
    assert captioner.device.type == "cuda" and next(captioner.model.parameters()).dtype == torch.float16
    texts = captioner.caption([Image.new("RGB", (50, 30), "red"), Image.new("RGB", (20, 60), "blue")])
    assert len(texts) == 2 and all(texts)
    assert torch.cuda.memory_allocated() > 0
    captioner.close()
    assert torch.cuda.memory_allocated() == 0
