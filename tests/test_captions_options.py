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
