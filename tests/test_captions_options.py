"""Clip skip and tag dropout."""

import torch
from conftest import EventLog, tiny_config, write_dataset

from core.base.models import load_models
from core.training import train
from core.training.train_data import drop_tags


def test_clip_skip_is_the_penultimate_layer_through_the_final_norm(tiny_model):
    import numpy as np

    from core.base.sample import generate, load_pipeline

    base = load_models(str(tiny_model))
    ids = base.text.tokenize(["a photo of sks dog"])
    last, _ = base.text(ids)
    base.text.clip_skip = 2
    skipped, _ = base.text(ids)
    encoder = base.text.encoders[0]
    states = encoder(ids[0], output_hidden_states=True).hidden_states
    torch.testing.assert_close(skipped, encoder.final_layer_norm(states[-2]))  # A1111's and sd-scripts' rule
    assert not torch.allclose(last, skipped)
    assert base.text.window_key != load_models(str(tiny_model)).text.window_key  # cached apart
    pipe = load_pipeline(str(tiny_model), device="cpu")  # the samples follow it
    kw = dict(seed=1, steps=2, width=64, height=64)
    plain = np.asarray(generate(pipe, "a photo of sks dog", **kw), dtype=float)
    two = np.asarray(generate(pipe, "a photo of sks dog", clip_skip=2, **kw), dtype=float)
    assert np.abs(plain - two).max() > 0


def test_tag_dropout_keeps_the_leading_tags_and_drops_about_its_share():
    caption = "sks, " + ", ".join(f"tag{i}" for i in range(200))
    kept = [drop_tags(caption, 1, 0.25, seed) for seed in range(20)]
    assert all(k.startswith("sks, ") for k in kept)
    share = sum(len(k.split(", ")) - 1 for k in kept) / (200 * 20)
    assert 0.7 < share < 0.8
    assert drop_tags(caption, 1, 0.0, 3) == caption and drop_tags(caption, 1, 0.25, 3) == kept[3]


def test_a_run_with_clip_skip_and_tag_dropout(tiny_model, tmp_path):
    from safetensors import safe_open

    cfg = tiny_config(tiny_model, write_dataset(tmp_path / "d", n=2), tmp_path / "out", **{
        "model.clip_skip": 2, "dataset.tag_dropout": 0.3, "dataset.keep_tokens": 1, "train.max_train_steps": 2,
        "sample.every_n_steps": 0, "output.save_state": False, "dataset.validation_split": 0.0})
    result = train.run(cfg, EventLog())
    with safe_open(result.lora_path, "pt") as f:
        meta = f.metadata()
    assert (meta["ss_clip_skip"], meta["ss_tag_dropout"], meta["ss_keep_tokens"]) == ("2", "0.3", "1")


def _long_caption(tokenizer, tokens: int) -> str:
    words = [f"w{i}" for i in range(400)]
    caption = ""
    for word in words:  # grow word by word until the caption is exactly ``tokens`` long (or just past it)
        caption = f"{caption} {word}".strip()
        if len(tokenizer(caption).input_ids) - 2 >= tokens:
            return caption
    raise AssertionError("the tokenizer splits too little")


def test_long_captions_are_encoded_in_several_clip_windows(tiny_model, tiny_sdxl):
    from core.base.text import chunked_ids

    base = load_models(str(tiny_model))
    tokenizer = base.text.tokenizers[0]
    caption = _long_caption(tokenizer, 200)
    full = tokenizer(caption).input_ids
    ids = chunked_ids(tokenizer, [caption], 3)
    assert ids.shape == (1, 3 * 77)
    windows = ids.reshape(3, 77)
    assert (windows[:, 0] == tokenizer.bos_token_id).all() and (windows[:, -1] == tokenizer.eos_token_id).all()
    assert windows[:, 1:-1].flatten()[:200].tolist() == full[1:201]  # the caption, cut into windows of 75
    cut, _ = base.text(base.text.tokenize([caption]))  # 77 tokens: all after the 75th are lost
    base.text.chunks = 3
    long, _ = base.text(base.text.tokenize([caption]))
    assert cut.shape[1] == 77 and long.shape[1] == 3 * 75 + 2
    torch.testing.assert_close(long[:, :76], cut[:, :76])  # the first window is the cut (CLIP reads left to right)
    first_75 = tokenizer.decode(full[1:76])
    short, _ = base.text(base.text.tokenize([first_75]))  # the same first window, nothing after it
    assert not torch.allclose(long[:, 76:-1], short[:, 76:-1])  # the words past 75 tokens now count
    assert base.text.window_key != load_models(str(tiny_model)).text.window_key  # cached apart
    sdxl = load_models(str(tiny_sdxl))
    sdxl.text.chunks = 2
    hidden, pooled = sdxl.text(sdxl.text.tokenize([caption]))
    assert hidden.shape[1] == 152 and pooled.shape[0] == 1  # SDXL: the first window's pooled embedding


def test_long_prompts_reach_the_image_and_the_health_report(tiny_model, tmp_path):
    import numpy as np

    from core.base.sample import generate, load_pipeline
    from core.data.health import check_dataset

    pipe = load_pipeline(str(tiny_model), device="cpu")
    caption = _long_caption(pipe.tokenizer, 160)
    cut = pipe.tokenizer.decode(pipe.tokenizer(caption).input_ids[1:76])
    kw = dict(seed=1, steps=2, width=64, height=64)
    auto = np.asarray(generate(pipe, caption, **kw), dtype=float)  # the Prompt tab: as many windows as it needs
    one = np.asarray(generate(pipe, caption, chunks=1, **kw), dtype=float)  # what training at 75 tokens sees
    assert np.abs(auto - one).max() > 0
    assert np.abs(one - np.asarray(generate(pipe, cut, chunks=1, **kw), dtype=float)).max() == 0
    data = write_dataset(tmp_path / "d", n=1)
    next(data.glob("*.txt")).write_text(caption)
    checks = lambda report: {c["check"]: c["message"] for f in report.files for c in f.checks}  # noqa: E731
    flagged = checks(check_dataset(data, resolution=64, tokenizer=pipe.tokenizer))
    assert "dataset.max_token_length to 225" in flagged["caption_too_long"]
    assert "caption_too_long" not in checks(check_dataset(data, resolution=64, tokenizer=pipe.tokenizer,
                                                          max_tokens=225))


def test_a_run_with_long_captions(tiny_model, tmp_path):
    from safetensors import safe_open

    data = write_dataset(tmp_path / "d", n=2)
    base = load_models(str(tiny_model))
    for caption in data.glob("*.txt"):
        caption.write_text(_long_caption(base.text.tokenizers[0], 140))
    cfg = tiny_config(tiny_model, data, tmp_path / "out", **{
        "dataset.max_token_length": 150, "train.max_train_steps": 2, "sample.every_n_steps": 2,
        "output.save_state": False, "dataset.validation_split": 0.0})
    log = EventLog()
    result = train.run(cfg, log)
    assert result.status == "completed" and log.of("sample")
    with safe_open(result.lora_path, "pt") as f:
        assert f.metadata()["ss_max_token_length"] == "150"
