"""Training on a messy real-world folder: only valid, non-excluded images train, in buckets, with augmentation."""

import json
import math

import torch
from safetensors import safe_open

from core.data.manifest import set_decision, set_repeats
from core.training import train
from tests.conftest import EventLog, tiny_config, write_dataset
from tests.test_health import CAPTIONS, write_corpus

EXCLUDED = {"blur b.png", "uniform.png"}


def test_training_on_the_odd_corpus_uses_only_the_valid_images(tiny_model, tmp_path):
    data = tmp_path / "odd corpus"
    write_corpus(data)
    for name in EXCLUDED:
        set_decision(data, name, "exclude", "flagged by the health report")
    set_repeats(data, "sub", 3)
    cfg = tiny_config(tiny_model, data, tmp_path / "out", name="odd", **{
        "dataset.resolution": 128, "dataset.bucket_step": 32, "dataset.random_flip": True,
        "dataset.shuffle_captions": True, "dataset.keep_tokens": 1, "dataset.caption_dropout": 0.2,
        "dataset.validation_split": 0.2, "train.batch_size": 2, "train.max_train_epochs": 1,
        "sample.prompts": [], "sample.every_n_steps": 0,  # validated once, at the end
        "output.save_every_n_steps": 0, "output.save_state": False})
    log = EventLog()
    result = train.run(cfg, log)
    assert result.status == "completed"

    usable = set(CAPTIONS) - EXCLUDED
    started = log.of("run_started")[0]
    assert started.num_train_images + started.num_validation_images == len(usable)
    warnings = " ".join(e.text for e in log.of("message") if e.level == "warning")
    for broken in ("truncated.png", "zero.jpg", "text.png"):
        assert broken in warnings
    notes = " ".join(e.text for e in log.of("message") if e.level == "info")
    assert "excluded in dataset.toml" in notes and "sub x3" in notes and "bucket(s)" in notes

    record = json.loads((result.run_dir / "buckets.json").read_text(encoding="utf-8"))
    trained = {row["file"] for row in record["images"]}
    assert len(trained) == started.num_train_images and trained <= usable
    assert not trained & EXCLUDED
    near = {"near a.png", "near b brighter.png", "near c resized.png"}
    assert near <= trained or not near & trained  # a near-duplicate group is never split
    dups = {"dup a.png", "dup b.webp", "dup c rotated.png"}
    assert dups <= trained or not dups & trained
    for row in record["images"]:
        w, h = row["bucket"]
        assert w % 32 == 0 and h % 32 == 0 and w * h <= 128 * 128
        assert row["target_size"] == [h, w]
        assert row["repeats"] == (3 if row["file"].startswith("sub/") else 1)
    if "strip.png" in trained:
        assert next(r for r in record["images"] if r["file"] == "strip.png")["bucket"] == [256, 64]
    assert len(record["buckets"]) >= 2  # the corpus has squares and other shapes
    # one epoch = every bucket's draws (repeats included) in batches of 2
    steps = sum(math.ceil(row["per_epoch"] / 2) for row in record["buckets"])
    assert log.of("run_started")[0].total_steps == steps == log.of("progress")[-1].step

    # the flipped latent of every training image is cached beside the plain one
    latents = list((tmp_path / "out" / ".cache" / "latents").rglob("*.safetensors"))
    assert len(latents) == 2 * started.num_train_images + started.num_validation_images

    with safe_open(result.lora_path, "pt") as f:
        meta = f.metadata()
    info = json.loads(meta["ss_bucket_info"])
    assert sum(b["count"] for b in info["buckets"].values()) == int(meta["ss_num_train_images"])
    assert meta["ss_enable_bucket"] == "True"
    assert "sks" in json.loads(meta["ss_tag_frequency"])["odd corpus"]


def test_buckets_off_trains_squares_and_matches_the_old_behaviour(tiny_model, tmp_path):
    data = write_dataset(tmp_path / "d", n=4, size=(80, 120))
    cfg = tiny_config(tiny_model, data, tmp_path / "out", **{
        "dataset.buckets": False, "dataset.resolution": 64, "sample.prompts": [], "train.max_train_steps": 2,
        "output.save_state": False})
    result = train.run(cfg, EventLog())
    record = json.loads((result.run_dir / "buckets.json").read_text(encoding="utf-8"))
    assert record["enabled"] is False
    assert {tuple(r["bucket"]) for r in record["images"]} == {(64, 64)}


def test_flip_latents_are_the_mirrored_image(tiny_model, tmp_path):
    """The second cached latent is the VAE's encoding of the mirrored picture."""
    from PIL import Image

    from core.base.models import load_models
    from core.data.dataset import scan_dataset
    from core.data.images import to_tensor
    from core.training.cache import FeatureCache, encode_latent_distribution
    from core.training.train_data import build_entries

    data = write_dataset(tmp_path / "d", n=1, size=(64, 64))
    cfg = tiny_config(tiny_model, data, tmp_path / "out")
    base = load_models(str(tiny_model), "", "auto", torch.float32)
    (entry,) = build_entries(cfg, scan_dataset(data).items, base, FeatureCache(tmp_path / "cache"), EventLog(),
                             "training", flips=True)
    plain, flipped = entry.latents(False)["mean"], entry.latents(True)["mean"]
    assert not torch.equal(plain, flipped)
    with Image.open(entry.item.path) as image:
        pixels = {m: to_tensor(image.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT) if m else
                               image.convert("RGB"))[None] for m in (False, True)}
    for mirrored, cached in ((False, plain), (True, flipped)):
        torch.testing.assert_close(encode_latent_distribution(base.vae, pixels[mirrored])["mean"][0], cached)


def test_latents_are_cached_in_batches_in_the_compute_precision(tiny_model, tmp_path):
    """bf16 caching: the same latents as fp32 up to bf16's precision, under their own cache keys, a few
    pictures per VAE call; in fp16 what overflows is encoded again in fp32."""
    from core.base.models import load_models
    from core.data.dataset import scan_dataset
    from core.training import train_data
    from core.training.cache import FeatureCache, encode_latent_distribution

    data = write_dataset(tmp_path / "d", n=6, size=(64, 64))
    base = load_models(str(tiny_model), "", "auto", torch.float32)
    items = scan_dataset(data).items
    calls = []
    original = base.vae.encode
    base.vae.encode = lambda x: calls.append(len(x)) or original(x)
    latents = {}
    for precision in ("no", "bf16"):
        cfg = tiny_config(tiny_model, data, tmp_path / "out", **{"train.mixed_precision": precision})
        log = EventLog()
        entries = train_data.build_entries(cfg, items, base, FeatureCache(tmp_path / "cache"), log, "training")
        latents[precision] = torch.stack([e.latents(False)["mean"] for e in entries])
        assert [(e.done, e.total) for e in log.of("phase")] == [(0, 6), (4, 6), (6, 6)]
    assert calls == [4, 2, 4, 2]  # one bucket, batches of 4 small pictures; bf16 did not reuse the fp32 entries
    sizes = [(64, 64), (512, 512), (640, 640), (768, 768), (1024, 1024), (1536, 640)]
    assert [train_data.pictures_per_encode(size) for size in sizes] == [4, 2, 1, 1, 1, 1]
    assert not torch.equal(latents["no"], latents["bf16"])
    torch.testing.assert_close(latents["bf16"], latents["no"], rtol=0.05, atol=0.05)
    base.vae.encode = original
    # fp16: a picture whose encoding overflows half precision is encoded again in fp32, alone
    pixels = torch.stack([torch.zeros(3, 64, 64), torch.full((3, 64, 64), 6e4)])  # the second overflows fp16
    full = encode_latent_distribution(base.vae, pixels)
    half = encode_latent_distribution(base.vae, pixels, torch.float16)
    assert torch.isfinite(half["mean"]).all() and torch.isfinite(full["mean"]).all()
    torch.testing.assert_close(half["mean"][1:], encode_latent_distribution(base.vae, pixels[1:])["mean"])  # fp32
    assert not torch.equal(half["mean"][0], full["mean"][0])  # the other stayed half precision
    torch.testing.assert_close(half["mean"][0], full["mean"][0], rtol=0.05, atol=0.05)


def test_captions_are_cached_in_batches_once_each(tiny_model, tmp_path):
    """Text conditioning is encoded a batch of captions at a time, each caption once, and reads back as the
    caption encoded alone would."""
    from core.base.models import load_models
    from core.training import train_data
    from core.training.cache import FeatureCache

    base = load_models(str(tiny_model), "", "auto", torch.float32)
    cache = FeatureCache(tmp_path / "cache")
    calls = []
    original = base.text.encode
    base.text.encode = lambda captions: calls.append(len(captions)) or original(captions)
    captions = [f"a photo of sks, picture {i}" for i in range(20)] + ["a photo of sks, picture 3", ""]
    train_data.cache_texts(captions, base, cache)
    assert calls == [16, 5]  # 21 different captions, 16 a call
    train_data.cache_texts(captions, base, cache)
    assert calls == [16, 5]  # all cached: nothing encoded again
    for caption in ("a photo of sks, picture 3", ""):
        hidden, _ = original([caption])
        torch.testing.assert_close(train_data.cached_text(caption, base, cache)()["hidden"], hidden[0],
                                   rtol=1e-5, atol=1e-5)
    assert calls == [16, 5]
