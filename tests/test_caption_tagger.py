"""The wd14 booru tagger: tag selection and formatting, the tiny ONNX tagger, caption_folder and the command."""

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.captioning import caption_tagger as tagger
from core.captioning.caption import CaptionError, caption_folder
from core.captioning.caption_tagger import CHARACTER, GENERAL, RATING, Tag, WdTagger, format_tag, select_tags
from tests.conftest import EventLog
from tests.test_caption import core_cmd, noise

RATINGS = {"general", "sensitive", "questionable", "explicit"}  # the tiny tagger's rating rows


@pytest.fixture(scope="module")
def tiny_wd(tmp_path_factory) -> Path:
    return tagger.write_tiny_tagger(tmp_path_factory.mktemp("taggers") / "tiny-wd14")


def pictures() -> list[Image.Image]:
    """Noise of a few sizes and some flat colours: the tiny tagger gives them different tags."""
    rng = np.random.default_rng(0)
    noisy = [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for w, h in [(48, 40), (20, 60), (64, 64)]]
    return noisy + [Image.new("RGB", (50, 30), colour) for colour in ("red", "white", "navy")]


def tags_of(text: str) -> list[str]:
    return [t for t in text.split(", ") if t]


# --------------------------------------------------------------------------
# from scores to tags (no model)


@pytest.mark.parametrize("name, expected", [
    ("long_hair", "long hair"),
    ("looking_at_viewer", "looking at viewer"),
    ("star_(symbol)", "star \\(symbol\\)"),
    ("hatsune_miku_(append)", "hatsune miku \\(append\\)"),
    ("^_^", "^_^"),
    ("o_o", "o_o"),
    (">_<", ">_<"),
    ("0_0", "0_0"),
    ("(o)_(o)", "\\(o\\)_\\(o\\)"),
    ("no_bra", "no bra"),
    (":d", ":d"),
    ("1girl", "1girl"),
])
def test_tags_are_written_as_prompts_spell_them(name, expected):
    assert format_tag(name) == expected


def test_select_tags_thresholds_order_exclusions_and_ratings():
    tags = [Tag("general", RATING), Tag("sensitive", RATING), Tag("solo", GENERAL), Tag("long_hair", GENERAL),
            Tag("^_^", GENERAL), Tag("star_(symbol)", GENERAL), Tag("hatsune_miku", CHARACTER),
            Tag("kirisame_marisa", CHARACTER), Tag("some_artist", 1)]
    scores = [0.9, 0.2, 0.5, 0.8, 0.35, 0.6, 0.95, 0.84, 0.99]
    # Characters above 0.85 first, then general tags strictly above 0.35, each by score; no rating, no artist.
    assert select_tags(tags, scores) == ["hatsune miku", "long hair", "star \\(symbol\\)", "solo"]
    assert select_tags(tags, scores, threshold=0.55, character_threshold=0.8) == [
        "hatsune miku", "kirisame marisa", "long hair", "star \\(symbol\\)"]
    assert select_tags(tags, scores, threshold=0.3) == ["hatsune miku", "long hair", "star \\(symbol\\)", "solo", "^_^"]
    assert select_tags(tags, scores, threshold=1.0, character_threshold=1.0) == []
    # Excluded tags match in any spelling: underscores or spaces, escaped or not, any case.
    assert select_tags(tags, scores, exclude=["Long Hair", "star \\(symbol\\)", "hatsune_miku"]) == ["solo"]
    assert select_tags(tags, scores, exclude=tagger.parse_tag_list("solo,, star_(symbol) ,")) == [
        "hatsune miku", "long hair"]
    # The rating, when asked for, is the best-scoring one, first.
    assert select_tags(tags, scores, include_rating=True)[:2] == ["general", "hatsune miku"]
    with pytest.raises(ValueError):
        select_tags(tags, scores[:-1])


def test_pictures_are_padded_on_white_resized_and_turned_bgr():
    red = Image.new("RGB", (40, 20), (255, 0, 0))
    batch = tagger.prepare(red, 32)
    assert batch.shape == (32, 32, 3) and batch.dtype == np.float32
    assert batch[16, 16].tolist() == [0.0, 0.0, 255.0]  # BGR: red is the last channel
    assert batch[0, 16].tolist() == [255.0, 255.0, 255.0]  # padded above and below on white
    assert batch.max() <= 255.0 and batch.min() >= 0.0
    see_through = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert tagger.prepare(see_through, 8).min() == 255.0  # transparent pixels count as white


@pytest.mark.parametrize("device, available, expected", [
    (None, ["CPUExecutionProvider"], ["CPUExecutionProvider"]),
    (None, ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    ("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]),
    ("cuda:1", ["CUDAExecutionProvider", "CPUExecutionProvider"],
     [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]),
])
def test_the_gpu_is_used_when_onnxruntime_can(device, available, expected):
    assert tagger._providers(device, available) == expected


def test_a_gpu_that_onnxruntime_cannot_use_is_a_clear_error():
    with pytest.raises(CaptionError, match="onnxruntime-gpu") as info:
        tagger._providers("cuda", ["CPUExecutionProvider"])
    assert info.value.kind == "config"
    with pytest.raises(CaptionError, match="unknown device"):
        tagger._providers("tpu", ["CPUExecutionProvider"])


# --------------------------------------------------------------------------
# the tiny ONNX tagger


def test_tiny_tagger_has_the_real_layout_and_is_deterministic(tiny_wd, tmp_path):
    import onnxruntime as ort

    rows = list(csv.DictReader(io.StringIO((tiny_wd / "selected_tags.csv").read_text(encoding="utf-8"))))
    assert list(rows[0]) == ["tag_id", "name", "category", "count"]
    assert {int(r["category"]) for r in rows} == {GENERAL, CHARACTER, RATING} and 30 <= len(rows) <= 60
    session = ort.InferenceSession(str(tiny_wd / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [32, 32, 3]
    assert session.get_outputs()[0].shape[-1] == len(rows)
    again = tagger.write_tiny_tagger(tmp_path / "again")
    assert (again / "model.onnx").read_bytes() == (tiny_wd / "model.onnx").read_bytes()
    other = tagger.write_tiny_tagger(tmp_path / "other", seed=1)
    assert (other / "model.onnx").read_bytes() != (tiny_wd / "model.onnx").read_bytes()
    with pytest.raises(FileExistsError):
        tagger.write_tiny_tagger(tiny_wd)


def test_tiny_tagger_tags_follow_the_rules(tiny_wd):
    with WdTagger(str(tiny_wd), device="cpu") as wd:
        assert wd.size == 32  # read from the model's input shape
        captions = wd.caption(pictures())
        scores = wd.scores(pictures())
    assert len(captions) == 6 and len(set(captions)) > 1  # pictures differ in their tags
    assert ((scores > 0.35) & (scores < 0.85)).any() and (scores < 0.35).any()  # scores spread around the thresholds
    for text in captions:
        tags = tags_of(text)
        assert tags and len(tags) == len(set(tags))
        assert not RATINGS & set(tags)
        assert tags[0] in {"hatsune miku", "kirisame marisa", "tiny \\(character\\)"}  # characters first
        assert {"long hair", "^_^", "star \\(symbol\\)"} <= set(tags)
        assert "hakurei reimu" not in tags and "no tag" not in tags  # far below any threshold
        assert all("_" not in t or t in {"^_^", "o_o", ">_<"} for t in tags), tags
        assert all("(" not in t.replace("\\(", "") for t in tags)
    with pytest.raises(CaptionError, match="closed"):
        wd.caption(pictures())


def test_a_higher_threshold_keeps_a_subset_of_the_tags(tiny_wd):
    with WdTagger(str(tiny_wd), device="cpu") as loose, \
            WdTagger(str(tiny_wd), device="cpu", threshold=0.7, character_threshold=0.95) as strict:
        wide, narrow = loose.caption(pictures()), strict.caption(pictures())
    for a, b in zip(wide, narrow, strict=True):
        assert set(tags_of(b)) <= set(tags_of(a))
    assert sum(map(len, map(tags_of, narrow))) < sum(map(len, map(tags_of, wide)))


def test_excluded_tags_and_the_rating_on_the_tiny_tagger(tiny_wd):
    exclude = "long hair, ^_^, Star_(symbol), hatsune_miku"
    with WdTagger(str(tiny_wd), device="cpu", exclude_tags=exclude, include_rating=True) as wd:
        captions = wd.caption(pictures())
    for text in captions:
        tags = tags_of(text)
        assert not {"long hair", "^_^", "star \\(symbol\\)", "hatsune miku"} & set(tags)
        assert tags[0] == "general" and not RATINGS & set(tags[1:])


# --------------------------------------------------------------------------
# caption_folder and the command


def test_caption_folder_with_the_tagger(tmp_path, tiny_wd):
    folder = tmp_path / "pics"
    folder.mkdir()
    for i, name in enumerate(["a.png", "b.png", "c.jpg", "kept.png"]):
        noise(folder / name, seed=i)
    (folder / "kept.txt").write_text("my own caption", encoding="utf-8")
    log = EventLog()
    report = caption_folder(folder, "wd14", model=str(tiny_wd), prefix="sks", batch_size=3, emit=log,
                            options={"threshold": 0.5})
    assert sorted(report.written) == ["a.png", "b.png", "c.jpg"] and report.skipped == ["kept.png"]
    for name in report.written:
        text = (folder / name).with_suffix(".txt").read_text(encoding="utf-8")
        assert text.startswith("sks, ") and "long hair" in text and "general" not in tags_of(text)
    assert (folder / "kept.txt").read_text(encoding="utf-8") == "my own caption"
    assert [e.done for e in log.of("caption_progress")] == [1, 2, 3]

    again = caption_folder(folder, "wd14", model=str(tiny_wd), overwrite=True)
    assert sorted(again.written) == ["a.png", "b.png", "c.jpg", "kept.png"]
    assert (folder / "kept.txt").read_text(encoding="utf-8") != "my own caption"
    # A threshold nothing passes: the pictures are reported, not given empty captions.
    none = caption_folder(folder, "wd14", model=str(tiny_wd), overwrite=True,
                          options={"threshold": 1.0, "character_threshold": 1.0})
    assert none.written == [] and all("lower --threshold" in why for _, why in none.failed)


@pytest.mark.parametrize("keep, message", [
    ("selected_tags.csv", "has no model.onnx;"),
    ("model.onnx", "has no selected_tags.csv;"),
    (None, "has no model.onnx and no selected_tags.csv"),
])
def test_a_tagger_folder_without_its_files_says_which_and_how_to_get_them(tmp_path, tiny_wd, keep, message):
    folder = tmp_path / "half-tagger"
    folder.mkdir()
    if keep:
        (folder / keep).write_bytes((tiny_wd / keep).read_bytes())
    pics = tmp_path / "pics"
    pics.mkdir()
    noise(pics / "a.png")
    with pytest.raises(CaptionError, match=message) as info:
        caption_folder(pics, "wd14", model=str(folder))
    assert "hf download SmilingWolf/wd-swinv2-tagger-v3 model.onnx selected_tags.csv" in str(info.value)
    assert info.value.kind == "model" and not list(pics.glob("*.txt"))


def test_mismatched_or_broken_tagger_files_are_refused(tmp_path, tiny_wd):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "model.onnx").write_bytes((tiny_wd / "model.onnx").read_bytes())
    rows = (tiny_wd / "selected_tags.csv").read_text(encoding="utf-8").splitlines()
    (folder / "selected_tags.csv").write_text("\n".join(rows[:-3]) + "\n", encoding="utf-8")
    with pytest.raises(CaptionError, match="different taggers"):
        WdTagger(str(folder), device="cpu")
    (folder / "selected_tags.csv").write_text("tag_id,name\n1,solo\n", encoding="utf-8")
    with pytest.raises(CaptionError, match="no category column"):
        WdTagger(str(folder), device="cpu")
    (folder / "selected_tags.csv").write_text((tiny_wd / "selected_tags.csv").read_text(encoding="utf-8"))
    (folder / "model.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(CaptionError, match="not an ONNX model"):
        WdTagger(str(folder), device="cpu")


def test_bad_tagger_options_fail_before_any_work(tmp_path, tiny_wd):
    folder = tmp_path / "pics"
    folder.mkdir()
    noise(folder / "a.png")
    for options, message in [({"threshold": 1.5}, "--threshold must be a score between 0 and 1"),
                             ({"character_threshold": -0.1}, "--character-threshold must be"),
                             ({"task": "caption"}, "no option --task .*florence2")]:
        with pytest.raises(CaptionError, match=message) as info:
            caption_folder(folder, "wd14", model=str(tiny_wd), options=options)
        assert info.value.kind == "config"
    with pytest.raises(CaptionError, match="no option --threshold .*wd14"):
        caption_folder(folder, "blip", options={"threshold": 0.5})
    with pytest.raises(CaptionError, match="writes tags, not text"):
        caption_folder(folder, "wd14", model=str(tiny_wd), max_new_tokens=10)
    assert not list(folder.glob("*.txt"))


def test_caption_command_with_the_tagger(tmp_path, capsys):
    made = core_cmd("tiny-captioner", tmp_path / "wd", "--kind", "wd14")
    assert made.returncode == 0, made.stderr
    assert "--captioner wd14" in made.stdout
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(3):
        noise(folder / f"img{i}.png", seed=i)
    out = core_cmd("caption", folder, "--captioner", "wd14", "--model", tmp_path / "wd", "--prefix", "sks",
                   "--threshold", "0.5", "--character-threshold", "0.9", "--exclude-tags", "long hair, ^_^")
    assert out.returncode == 0, out.stderr
    for i in range(3):
        tags = tags_of((folder / f"img{i}.txt").read_text(encoding="utf-8"))
        assert tags[0] == "sks" and "star \\(symbol\\)" in tags and not {"long hair", "^_^"} & set(tags)

    from tests.conftest import cli

    capsys.readouterr()
    assert cli("caption", folder, "--captioner", "deepdanbooru", "--overwrite") == 2
    assert capsys.readouterr().err.strip() == ("error: unknown captioner 'deepdanbooru'; choose one of: "
                                               "blip, florence2, wd14")
    assert cli("caption", folder, "--threshold", "0.5", "--overwrite") == 2
    misplaced = capsys.readouterr().err
    assert "--threshold" in misplaced and "wd14" in misplaced


def test_captioning_a_dataset_reaches_its_concept_folders_and_honours_the_caption_extension(tmp_path, tiny_wd,
                                                                                           capsys):
    """Training reads subfolders, so the captioner captions them too; the health report and the training
    scan then find every caption under the same extension."""
    from core.data.dataset import scan_dataset
    from core.data.health import check_dataset

    data = tmp_path / "data"
    (data / "close ups").mkdir(parents=True)
    noise(data / "top.png")
    noise(data / "close ups" / "face.png", seed=1)
    report = caption_folder(data, "wd14", model=str(tiny_wd), options={"threshold": 0.0},
                            caption_extension=".caption")
    assert sorted(report.written) == ["close ups/face.png", "top.png"]
    assert (data / "close ups" / "face.caption").read_text(encoding="utf-8")
    assert not list(data.rglob("*.txt"))
    scan = scan_dataset(data, ".caption")
    assert len(scan.items) == 2 and not scan.missing_captions
    health = check_dataset(data, resolution=64, caption_extension=".caption")
    assert health.summary["captioned"] == 2 and health.summary["uncaptioned"] == 0
    assert check_dataset(data, resolution=64).summary["captioned"] == 0  # .txt: none
    from tests.conftest import cli

    capsys.readouterr()
    assert cli("caption", data, "--captioner", "wd14", "--model", tiny_wd, "--caption-extension", "txt") == 2
    assert "--caption-extension 'txt'" in capsys.readouterr().err
