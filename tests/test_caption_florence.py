"""The Florence-2 captioner on a tiny random-weight model: loading, tasks, caption_folder and the command."""

import json
from pathlib import Path

import pytest
from PIL import Image

from core.captioning import caption_florence as florence
from core.captioning.caption import CaptionError, caption_folder
from core.captioning.caption_florence import Florence2Captioner
from tests.conftest import EventLog
from tests.test_caption import core_cmd, noise


@pytest.fixture(scope="module")
def tiny_florence(tmp_path_factory) -> Path:
    """What `python -m core tiny-captioner DIR --kind florence2` writes (built here, without a subprocess)."""
    from core.captioning.caption import write_tiny_captioner

    return write_tiny_captioner(tmp_path_factory.mktemp("captioners") / "tiny-florence2", kind="florence2")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many tiny ops: on a busy 2-core machine torch's thread pool makes them much slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def colours() -> list[Image.Image]:
    return [Image.new("RGB", size, colour) for size, colour in [((50, 30), "red"), ((20, 60), "white"),
                                                                   ((64, 64), "navy")]]


def test_tiny_florence2_loads_with_transformers_and_captions(tiny_florence):
    from transformers import Florence2ForConditionalGeneration, Florence2Processor

    processor = Florence2Processor.from_pretrained(tiny_florence)
    model = Florence2ForConditionalGeneration.from_pretrained(tiny_florence)
    assert processor.image_token == "<image>" and model.config.image_token_id == processor.image_token_id
    assert len(processor.tokenizer) == model.config.text_config.vocab_size
    # One image token per feature the vision tower gives a 64 px picture (8x8, plus one).
    assert processor.num_image_tokens == 65

    with Florence2Captioner(str(tiny_florence), device="cpu", task="caption") as captioner:
        assert captioner.task_prompt == "<CAPTION>"
        texts = captioner.caption(colours(), max_new_tokens=6)
    assert len(texts) == 3
    assert all(t and t == t.strip() and "\n" not in t and "<" not in t and t.isascii() for t in texts), texts
    with pytest.raises(CaptionError, match="closed"):
        captioner.caption(colours())
    with pytest.raises(FileExistsError):
        florence.write_tiny_florence2(tiny_florence)


def test_tasks_and_their_prompts():
    assert Florence2Captioner.check_options({}) == {"task": "more-detailed"}
    assert florence.TASKS["more-detailed"] == "<MORE_DETAILED_CAPTION>"
    assert florence.TASKS["detailed"] == "<DETAILED_CAPTION>"
    with pytest.raises(CaptionError, match="choose one of: caption, detailed, more-detailed") as info:
        Florence2Captioner.check_options({"task": "poem"})
    assert info.value.kind == "config"
    with pytest.raises(CaptionError, match="no option --threshold .*wd14"):
        Florence2Captioner.check_options({"threshold": 0.5})


def test_caption_folder_with_florence2(tmp_path, tiny_florence):
    folder = tmp_path / "pics"
    folder.mkdir()
    for i, name in enumerate(["a.png", "b.png", "c.jpg", "kept.png"]):
        noise(folder / name, seed=i)
    (folder / "kept.txt").write_text("my own caption", encoding="utf-8")
    log = EventLog()
    report = caption_folder(folder, "florence2", model=str(tiny_florence), prefix="sks", batch_size=2, emit=log,
                            device="cpu", max_new_tokens=5, options={"task": "detailed"})
    assert sorted(report.written) == ["a.png", "b.png", "c.jpg"] and report.skipped == ["kept.png"]
    for name in report.written:
        text = (folder / name).with_suffix(".txt").read_text(encoding="utf-8")
        assert text.startswith("sks, ") and len(text) > 5 and "\n" not in text
    assert (folder / "kept.txt").read_text(encoding="utf-8") == "my own caption"
    assert [e.done for e in log.of("caption_progress")] == [1, 2, 3]

    again = caption_folder(folder, "florence2", model=str(tiny_florence), overwrite=True, device="cpu",
                           max_new_tokens=5)
    assert sorted(again.written) == ["a.png", "b.png", "c.jpg", "kept.png"]
    assert (folder / "kept.txt").read_text(encoding="utf-8") != "my own caption"


def test_a_model_that_is_not_a_native_florence2_is_refused(tmp_path, tiny_florence):
    config = json.loads((tiny_florence / "config.json").read_text())
    folder = tmp_path / "not-florence"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "blip"}))
    with pytest.raises(CaptionError, match="not Florence-2"):
        Florence2Captioner(str(folder), device="cpu")
    original = {**config, "vision_config": {**config["vision_config"], "model_type": "davit"}}
    (folder / "config.json").write_text(json.dumps(original))
    with pytest.raises(CaptionError, match="remote-code layout.*florence-community/Florence-2-large"):
        Florence2Captioner(str(folder), device="cpu")


def test_a_florence2_hub_model_that_is_not_cached_offline_says_how_to_download_it(tmp_path):
    with pytest.raises(CaptionError, match="HF_HUB_OFFLINE") as info:
        Florence2Captioner("example-org/no-such-florence", device="cpu")
    assert "hf download example-org/no-such-florence --local-dir models/no-such-florence" in str(info.value)
    with pytest.raises(CaptionError, match="hf download florence-community/Florence-2-base"):
        Florence2Captioner.check_model(str(tmp_path / "does-not-exist"))


def test_caption_command_with_florence2(tmp_path, tiny_florence, capsys):
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(2):
        noise(folder / f"img{i}.png", seed=i)
    out = core_cmd("caption", folder, "--captioner", "florence2", "--model", tiny_florence, "--task",
                   "caption", "--max-new-tokens", "4", "--prefix", "sks", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    for i in range(2):
        assert (folder / f"img{i}.txt").read_text(encoding="utf-8").startswith("sks, ")
    assert "Loading weights" not in out.stderr
    from tests.conftest import cli

    capsys.readouterr()
    assert cli("caption", folder, "--captioner", "florence2", "--task", "poem", "--overwrite") == 2
    assert "caption, detailed, more-detailed" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs an NVIDIA GPU")
def test_florence2_runs_in_fp16_on_the_gpu_and_frees_it(tiny_florence):
    import torch

    captioner = Florence2Captioner(str(tiny_florence))  # no device: the GPU is picked
    assert captioner.device.type == "cuda" and next(captioner.model.parameters()).dtype == torch.float16
    texts = captioner.caption(colours(), max_new_tokens=8)
    assert len(texts) == 3 and all(texts)
    assert torch.cuda.memory_allocated() > 0
    captioner.close()
    assert torch.cuda.memory_allocated() == 0
