"""The dataset health report over a folder of the odd files users really bring."""

import json

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from core import cli
from core.data.dataset import DatasetError
from core.data.health import (
    BLUR_THRESHOLD,
    NEAR_THRESHOLD,
    HealthReport,
    check_dataset,
    dhash,
    format_report,
    laplacian_variance,
)

LONG_CAPTION = "sks, " + " ".join(["fluffy"] * 119)  # 120 words


def picture(seed: int, size=(512, 512)) -> Image.Image:
    """A sharp RGB picture: 32 px colour blocks plus fine noise, different for every seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    blocks = rng.integers(0, 256, (h // 32 + 1, w // 32 + 1, 3))
    pixels = np.kron(blocks, np.ones((32, 32, 1)))[:h, :w] + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def exif_rotated(upright: Image.Image) -> tuple[Image.Image, Image.Exif]:
    """Pixels stored sideways plus the EXIF flag (6: rotate 90° clockwise) that makes them upright."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return upright.transpose(Image.Transpose.ROTATE_90), exif


# Every usable image with its caption (None: no caption file). Files absent here are broken or not images.
CAPTIONS = {
    "clean.png": "sks, dog, red ball",
    "cmyk.jpg": "sks, dog",
    "deep 16bit.png": " SKS,  Dog ",
    "grey.png": "sks, dog",
    "palette.png": "sks, cat",
    "rotated.jpg": "sks, cat",
    "strip.png": "sks, banner",
    "dup a.png": "sks, dog",
    "dup b.webp": "sks, dog",
    "dup c rotated.png": "sks, dog",
    "near a.png": "sks, cat",
    "near b brighter.png": "sks, cat",
    "near c resized.png": "sks, cat",
    "blur a.png": "sks, red ball",
    "blur b.png": "sks, red ball",
    "uniform.png": "sks",
    "small.png": "sks, tiny",
    "名前 ça.png": "sks, dog, red ball",
    "sub/nested.png": "sks, dog",
    "no caption.png": None,
    "empty caption.png": "  \n",
    "long caption.png": LONG_CAPTION,
    "no trigger.png": "dog, red ball",
}
CLEAN = {"clean.png", "cmyk.jpg", "deep 16bit.png", "grey.png", "palette.png", "rotated.jpg", "dup a.png",
         "near a.png", "blur a.png", "名前 ça.png", "sub/nested.png"}
EXPECTED = {  # file: (status, [checks in report order]) without a tokenizer
    "truncated.png": ("error", ["unreadable"]),
    "zero.jpg": ("error", ["unreadable"]),
    "text.png": ("error", ["unreadable"]),
    "strip.png": ("warning", ["small", "aspect"]),
    "dup b.webp": ("warning", ["duplicate"]),
    "dup c rotated.png": ("warning", ["duplicate"]),
    "near b brighter.png": ("warning", ["near_duplicate"]),
    "near c resized.png": ("warning", ["near_duplicate"]),
    "blur b.png": ("warning", ["blurry", "near_duplicate"]),
    "uniform.png": ("warning", ["uniform"]),
    "small.png": ("warning", ["small"]),
    "no caption.png": ("warning", ["caption_missing"]),
    "empty caption.png": ("warning", ["caption_empty"]),
    "no trigger.png": ("warning", ["trigger_missing"]),
}
TAGS = [("sks", 20), ("dog", 10), ("cat", 5), ("red ball", 5), ("banner", 1), (LONG_CAPTION[5:], 1),
        ("tiny", 1)]


def write_corpus(folder):
    folder.mkdir()
    (folder / "sub").mkdir()
    pictures = {name: picture(seed) for seed, name in enumerate(sorted(CAPTIONS))}

    for name in ("clean.png", "名前 ça.png", "sub/nested.png", "no caption.png", "empty caption.png",
                 "long caption.png", "no trigger.png", "blur a.png", "dup a.png"):
        pictures[name].save(folder / name)
    pictures["cmyk.jpg"].convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    grey16 = np.asarray(pictures["deep 16bit.png"].convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey16).save(folder / "deep 16bit.png")
    assert Image.open(folder / "deep 16bit.png").mode.startswith("I")
    pictures["grey.png"].convert("L").save(folder / "grey.png")
    palette = pictures["palette.png"].quantize(64)
    palette.paste(0, (0, 0, 100, 100))  # index 0 becomes transparent: flattened onto white
    palette.save(folder / "palette.png", transparency=0)
    stored, exif = exif_rotated(picture(100, (800, 520)))
    stored.save(folder / "rotated.jpg", quality=95, exif=exif)
    picture(101, (10000, 40)).save(folder / "strip.png")
    # exact duplicates: the same pixels as a lossless WebP and as a sideways PNG with an EXIF flag
    pictures["dup a.png"].save(folder / "dup b.webp", lossless=True)
    stored, exif = exif_rotated(pictures["dup a.png"])
    stored.save(folder / "dup c rotated.png", exif=exif)
    near = picture(102, (640, 640))
    near.save(folder / "near a.png")
    ImageEnhance.Brightness(near).enhance(1.1).save(folder / "near b brighter.png")
    near.resize((560, 560), Image.Resampling.LANCZOS).save(folder / "near c resized.png")
    pictures["blur a.png"].filter(ImageFilter.GaussianBlur(radius=4)).save(folder / "blur b.png")
    Image.new("RGB", (512, 512), (128, 128, 128)).save(folder / "uniform.png")
    picture(103, (100, 100)).save(folder / "small.png")

    # broken files: truncated, empty, text with an image extension
    full = (folder / "clean.png").read_bytes()
    (folder / "truncated.png").write_bytes(full[: len(full) // 2])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.png").write_text("this is not a picture")
    # not reported: hidden files, sidecars, and non-image files that do not decode
    (folder / ".hidden.png").write_bytes(b"junk")
    (folder / "notes.dat").write_bytes(b"\x00\x01junk")
    (folder / "readme.md").write_text("# my dataset")
    for name, caption in CAPTIONS.items():
        if caption is not None:
            (folder / name).with_suffix(".txt").write_text(caption, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("health") / "my dataset")


@pytest.fixture(scope="module")
def report(corpus) -> HealthReport:
    return check_dataset(corpus, resolution=512, trigger="sks")


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")


def pairs(report: HealthReport) -> dict[str, tuple[str, list[str]]]:
    return {f.file: (f.status, [c["check"] for c in f.checks]) for f in report.files}


# --------------------------------------------------------------------------
# the corpus


def test_every_finding_is_expected_and_nothing_else(report):
    assert pairs(report) == EXPECTED
    assert [f.file for f in report.files] == sorted(EXPECTED)


def test_clean_images_are_not_flagged(report):
    flagged = {f.file for f in report.files}
    assert CLEAN <= set(CAPTIONS)
    assert not CLEAN & flagged
    assert set(CAPTIONS) - flagged == CLEAN | {"long caption.png"}  # only flagged with a tokenizer


def test_summary_counts(report):
    assert report.summary == {
        "images": 26, "usable": 23, "errors": 3, "warnings": 11, "excluded": 0, "kept": 0,
        "captioned": 21, "uncaptioned": 2,
        "duplicate_groups": 1, "near_duplicate_groups": 2, "tokens_checked": False,
        "masked": 1,  # the palette picture with a transparent index: its transparency is a loss mask
        "caption_style": "tags",
    }


def test_groups(report):
    assert report.duplicate_groups == [["dup a.png", "dup b.webp", "dup c rotated.png"]]
    assert report.near_duplicate_groups == [["blur a.png", "blur b.png"],
                                            ["near a.png", "near b brighter.png", "near c resized.png"]]


def test_tag_frequency_most_common_first(report):
    assert report.tag_frequency == TAGS


def test_sentence_captions_are_counted_by_word_not_split_into_tags():
    """BLIP and Florence write sentences: their commas separate clauses, and a whole sentence is no "tag"."""
    from core.data.health import caption_style, tag_frequency

    sentences = ["a photo of a dog sitting on the grass, looking at the camera",
                 "a dog running on a beach, with waves behind it", "a close up of a dog's face"]
    assert caption_style(sentences) == "sentences"
    counts = dict(tag_frequency(sentences))
    assert counts["dog"] == 2 and counts["dog's"] == 1 and counts["grass"] == 1
    assert "a" not in counts and "looking at the camera" not in counts
    tags = ["1girl, solo, red hair, smile", "1girl, red hair, outdoors", "sks"]
    assert caption_style(tags) == "tags" and tag_frequency(tags)[:2] == [("1girl", 2), ("red hair", 2)]


def test_messages_say_what_and_give_the_numbers(report):
    messages = {(f.file, c["check"]): c["message"] for f in report.files for c in f.checks}
    assert "truncated" in messages["truncated.png", "unreadable"]
    assert "empty (0 bytes)" in messages["zero.jpg", "unreadable"]
    assert "not an image" in messages["text.png", "unreadable"]
    assert messages["small.png", "small"].startswith("100×100 is below the training resolution 512: it will be "
                                                     "upscaled")
    assert "10000×40" in messages["strip.png", "aspect"] and "250.0:1" in messages["strip.png", "aspect"]
    assert "cropped heavily (a square crop keeps 0.4% of it)" in messages["strip.png", "aspect"]
    assert "same pixels as dup a.png" in messages["dup b.webp", "duplicate"]
    assert "near a.png" in messages["near c resized.png", "near_duplicate"]
    assert f"threshold {NEAR_THRESHOLD}" in messages["near c resized.png", "near_duplicate"]
    assert f"below {BLUR_THRESHOLD:g}" in messages["blur b.png", "blurry"]
    assert "std 0.0" in messages["uniform.png", "uniform"]
    assert "no caption.txt" in messages["no caption.png", "caption_missing"]
    assert "'sks'" in messages["no trigger.png", "trigger_missing"]


def test_token_length_with_the_models_tokenizer(corpus, tokenizer):
    report = check_dataset(corpus, resolution=512, tokenizer=tokenizer, trigger="sks")
    expected = {**EXPECTED, "long caption.png": ("warning", ["caption_too_long"])}
    assert pairs(report) == expected
    assert report.summary["tokens_checked"] is True
    (finding,) = [f for f in report.files if f.file == "long caption.png"]
    tokens = len(tokenizer(LONG_CAPTION)["input_ids"]) - 2
    assert finding.checks[0]["message"].startswith(f"caption is {tokens} tokens, over CLIP's 75")


def test_without_trigger_no_trigger_check(corpus):
    report = check_dataset(corpus, resolution=512)
    assert {f for f, (_, checks) in pairs(report).items() if "trigger_missing" in checks} == set()


# --------------------------------------------------------------------------
# single checks


def test_exif_orientation_is_applied_before_measuring(tmp_path):
    stored, exif = exif_rotated(picture(1, (800, 520)))
    stored.save(tmp_path / "sideways.jpg", quality=95, exif=exif)
    (tmp_path / "sideways.txt").write_text("sks")
    (finding,) = check_dataset(tmp_path, resolution=600).files
    assert finding.checks[0]["message"].startswith("800×520 is below the training resolution 600")


def test_blur_measure_separates_sharp_from_blurred():
    checker = Image.fromarray(((np.indices((512, 512)) // 8).sum(axis=0) % 2 * 255).astype(np.uint8))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512), dtype=np.uint8))
    for sharp in (checker, noise):
        blurred = sharp.filter(ImageFilter.GaussianBlur(radius=4))
        assert laplacian_variance(np.asarray(sharp)) > 10 * BLUR_THRESHOLD
        assert laplacian_variance(np.asarray(blurred)) < BLUR_THRESHOLD
    assert laplacian_variance(np.zeros((2, 500))) is None


def test_dhash_is_stable_under_edits_and_differs_between_pictures():
    image = picture(7)
    base = dhash(image.convert("L"))
    edits = [ImageEnhance.Brightness(image).enhance(1.1), image.resize((300, 300)), image.convert("L")]
    assert all((dhash(e.convert("L")) ^ base).bit_count() <= NEAR_THRESHOLD for e in edits)
    others = [dhash(picture(seed).convert("L")) for seed in range(20, 30)]
    assert min((h ^ base).bit_count() for h in others) > 3 * NEAR_THRESHOLD


def test_near_threshold_zero_still_finds_exact_edits_only(corpus):
    report = check_dataset(corpus, resolution=512, near_threshold=-1)
    assert report.near_duplicate_groups == []
    assert report.duplicate_groups == [["dup a.png", "dup b.webp", "dup c rotated.png"]]


def test_missing_folder_raises(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        check_dataset(tmp_path / "nope")


# --------------------------------------------------------------------------
# JSON and the command line


def test_manifest_decisions_show_and_change_the_groups(corpus):
    from core.data.manifest import set_decision

    set_decision(corpus, "dup b.webp", "exclude", "a copy")
    set_decision(corpus, "near b brighter.png", "exclude")
    set_decision(corpus, "small.png", "keep", "the only picture of the back")
    try:
        report = check_dataset(corpus, trigger="sks")
    finally:
        (corpus / "dataset.toml").unlink()
    by_file = {f.file: f for f in report.files}
    assert by_file["dup b.webp"].decision == "exclude" and by_file["small.png"].decision == "keep"
    assert by_file["near c resized.png"].decision is None
    assert by_file["dup b.webp"].status == "ok" and not by_file["dup b.webp"].checks  # no longer a duplicate
    # the excluded copies no longer count: what remains in training is still grouped
    assert report.duplicate_groups == [["dup a.png", "dup c rotated.png"]]
    assert ["near a.png", "near c resized.png"] in report.near_duplicate_groups
    assert all("near b brighter.png" not in g for g in report.near_duplicate_groups)
    s = report.summary
    assert (s["usable"], s["excluded"], s["kept"]) == (21, 2, 1)
    assert s["warnings"] == 11 - 1 - 1 - 1  # dup b, near b excluded; small kept
    text = format_report(report)
    assert "small.png [kept]: warning" in text and "dup b.webp [excluded]: ok" in text


def test_json_layout(report):
    data = report.to_json()
    assert list(data) == ["version", "folder", "resolution", "summary", "files", "duplicate_groups",
                          "near_duplicate_groups", "tag_frequency", "masks"]
    assert data["version"] == 1 and isinstance(data["folder"], str) and data["resolution"] == 512
    kinds = {"tokens_checked": bool, "caption_style": str}
    assert all(isinstance(v, kinds.get(k, int)) for k, v in data["summary"].items())
    for f in data["files"]:
        assert set(f) == {"file", "status", "checks", "decision"} and f["status"] in ("error", "warning")
        assert f["decision"] is None
        assert all(set(c) == {"check", "message"} and isinstance(c["message"], str) for c in f["checks"])
    assert all(isinstance(name, str) for group in data["duplicate_groups"] + data["near_duplicate_groups"]
               for name in group)
    assert data["tag_frequency"][:2] == [{"tag": "sks", "count": 20}, {"tag": "dog", "count": 10}]
    assert json.loads(json.dumps(data)) == data


def test_cli_json_matches_the_report(corpus, tiny_model, tokenizer, capsys):
    code = cli.main(["check-dataset", str(corpus), "--trigger", "sks", "--model", str(tiny_model), "--json"])
    out = capsys.readouterr()
    assert code == 0
    expected = check_dataset(corpus, resolution=512, tokenizer=tokenizer, trigger="sks").to_json()
    assert json.loads(out.out) == expected


def test_cli_text_report(corpus, report, capsys):
    assert cli.main(["check-dataset", str(corpus), "--trigger", "sks"]) == 0
    out = capsys.readouterr().out
    assert out == format_report(report) + "\n"
    lines = out.splitlines()
    assert "images: 26 (23 usable, 3 unreadable, 0 excluded)" in lines
    assert any(line.startswith("caption token length: not checked") for line in lines)
    strip = [line for line in lines if line.startswith("strip.png: warning: ")]
    assert len(strip) == 1 and "; " in strip[0]
    assert "  dup a.png, dup b.webp, dup c rotated.png" in lines
    tags = lines[lines.index("most common tags (of 7):") + 1:]
    shown = [line.split(None, 1)[1] for line in tags]
    assert shown == ["sks", "dog", "cat", "red ball", "banner", LONG_CAPTION[5:62] + "...", "tiny"]


@pytest.mark.parametrize("args", [["nope"], [".", "--model", "no-model-here"]], ids=["folder", "model"])
def test_cli_bad_input_is_one_error_line(tmp_path, capsys, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["check-dataset", *args]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith("error: ") and len(out.err.splitlines()) == 1
