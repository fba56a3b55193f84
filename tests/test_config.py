"""The TOML config: round trip, overrides, and one test per validation error."""

import tomllib

import pytest

from core import config
from core.config import ConfigError


@pytest.fixture
def paths(tmp_path, tiny_model):
    data = tmp_path / "pics"
    data.mkdir()
    return {"model": {"path": str(tiny_model)}, "dataset": {"path": str(data)}}


def test_defaults_round_trip_through_toml(tmp_path, paths):
    cfg = config.from_dict(paths)
    cfg.sample.prompts = ["a photo of sks", "sks in a garden, \"quoted\" ünïcode"]
    cfg.lora.alpha = 8.5
    path = tmp_path / "run.toml"
    config.save(cfg, path)
    assert config.load(path) == cfg
    assert tomllib.loads(path.read_text())["config_version"] == config.CONFIG_VERSION


def test_issue_example_keys_exist(tmp_path, paths):
    text = f"""
[model]
path = "{paths['model']['path']}"
[dataset]
path = "{paths['dataset']['path']}"
resolution = 512
validation_split = 0.1
[lora]
rank = 16
alpha = 16
[train]
max_train_steps = 1000
batch_size = 1
learning_rate = 1e-4
optimizer = "adamw8bit"
mixed_precision = "no"
gradient_checkpointing = false
seed = 0
[sample]
prompts = ["a photo of sks"]
every_n_steps = 200
[output]
dir = "outputs"
name = "my-lora"
save_every_n_steps = 500
"""
    path = tmp_path / "c.toml"
    path.write_text(text)
    cfg = config.load(path)
    assert cfg.lora.alpha == 16.0 and isinstance(cfg.lora.alpha, float)
    assert cfg.sample.prompts == ["a photo of sks"]


def test_overrides_parse_toml_values_and_bare_strings(tmp_path, paths):
    path = tmp_path / "c.toml"
    config.save(config.from_dict(paths), path)
    cfg = config.load(path, ["train.learning_rate=5e-5", "sample.prompts=[\"x\", \"y\"]", "output.name=my run",
                             "train.gradient_checkpointing=true", "lora.rank=8"])
    assert cfg.train.learning_rate == 5e-5
    assert cfg.sample.prompts == ["x", "y"]
    assert cfg.output.name == "my run"
    assert cfg.train.gradient_checkpointing is True
    assert cfg.lora.rank == 8


def test_resolve_paths_makes_local_paths_absolute(paths, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    cfg = config.from_dict({**paths, "output": {"dir": "outs"}})
    resolved = config.resolve_paths(cfg)
    assert resolved.output.dir == str(tmp_path / "outs")
    hub = config.resolve_paths(config.from_dict({**paths, "model": {"path": "someone/some-model"}},
                                                 check_paths=False))
    assert hub.model.path == "someone/some-model"


def test_field_info_drives_widgets():
    info = config.field_info("train", "optimizer")
    assert info["choices"][:3] == ["adamw8bit", "adamw", "prodigy"] and info["default"] == "adamw8bit" and info["help"]
    assert config.field_info("dataset", "resolution")["multiple_of"] == 8
    assert config.field_info("lora", "rank")["group"] == "basic"


BAD = [
    # (section, key, value, words the message must contain)
    ("lora", "rank", 0, ["lora.rank", "0", "1 to 1024"]),
    ("lora", "rank", 2.5, ["lora.rank", "whole number"]),
    ("lora", "rnak", 4, ["unknown key lora.rnak", "did you mean 'rank'"]),
    ("lora", "alpha", "big", ["lora.alpha", "must be a number"]),
    ("lora", "target_modules", "to_q", ["lora.target_modules", "list of str"]),
    ("dataset", "resolution", 500, ["dataset.resolution", "multiple of 8"]),
    ("dataset", "resolution", 32, ["dataset.resolution", "64 to 4096"]),
    ("dataset", "validation_split", 1.5, ["dataset.validation_split", "0.0 to 0.9"]),
    ("dataset", "caption_extension", "txt", ["dataset.caption_extension", "start with a dot"]),
    ("dataset", "caption_extension", ".txt/../../x", ["dataset.caption_extension", "letters or digits"]),
    ("output", "name", "n" * 240, ["output.name", "240 characters", "at most 128 bytes"]),
    ("output", "name", "é" * 100, ["output.name", "200 bytes"]),
    ("train", "optimizer", "sgd", ["train.optimizer", "'sgd'", "'adamw8bit'", "'adamw'"]),
    ("train", "mixed_precision", "fp8", ["train.mixed_precision", "'bf16'"]),
    ("train", "learning_rate", float("nan"), ["train.learning_rate", "finite"]),
    ("train", "learning_rate", -1.0, ["train.learning_rate", "out of range"]),
    ("train", "gradient_checkpointing", "yes", ["train.gradient_checkpointing", "true or false"]),
    ("train", "lr_scheduler", "exp", ["train.lr_scheduler", "cosine"]),
    ("train", "batch_size", 0, ["train.batch_size", "1 to 1024"]),
    ("sample", "prompts", ["ok", " "], ["sample.prompts[1]", "empty"]),
    ("sample", "every_n_steps", -1, ["sample.every_n_steps", "out of range"]),
    ("output", "name", "a/b", ["output.name", "file name"]),
    ("output", "name", "", ["output.name"]),
    ("output", "save_precision", "fp64", ["output.save_precision", "'fp16'"]),
]


@pytest.mark.parametrize("section,key,value,words", BAD, ids=[f"{s}.{k}={v!r}" for s, k, v, _ in BAD])
def test_bad_value_is_named_in_the_error(paths, section, key, value, words):
    raw = {**paths}
    raw.setdefault(section, {})
    raw[section] = {**raw[section], key: value}
    with pytest.raises(ConfigError) as info:
        config.from_dict(raw)
    for word in words:
        assert word in str(info.value)


def test_output_dir_that_is_a_file_is_a_config_error(paths, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    for out in (tmp_path / "a-file", tmp_path / "a-file" / "runs"):
        with pytest.raises(ConfigError, match=r"output.dir = .*is a file, not a folder"):
            config.from_dict({**paths, "output": {"dir": str(out)}})


def test_unknown_section(paths):
    with pytest.raises(ConfigError, match=r"unknown section \[trian\].*did you mean 'train'"):
        config.from_dict({**paths, "trian": {}})


def test_missing_dataset_folder(paths, tmp_path):
    with pytest.raises(ConfigError, match="dataset.path = .*does not exist"):
        config.from_dict({**paths, "dataset": {"path": str(tmp_path / "nope")}})


def test_dataset_path_is_a_file(paths, tmp_path):
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        config.from_dict({**paths, "dataset": {"path": str(f)}})


def test_model_folder_without_model_index(paths, tmp_path):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    with pytest.raises(ConfigError, match="not a diffusers model folder"):
        config.from_dict({**paths, "model": {"path": str(empty)}})


def test_model_path_neither_folder_nor_hub_id(paths, tmp_path):
    with pytest.raises(ConfigError, match="no such folder, and it is not a hub id"):
        config.from_dict({**paths, "model": {"path": str(tmp_path / "a" / "b" / "c")}})


def test_model_path_empty(paths):
    with pytest.raises(ConfigError, match="model.path is empty"):
        config.from_dict({**paths, "model": {"path": ""}})


def test_hub_id_is_accepted_without_download(paths):
    cfg = config.from_dict({**paths, "model": {"path": "stable-diffusion-v1-5/stable-diffusion-v1-5"}})
    assert cfg.model.path.startswith("stable-diffusion")


def test_newer_config_version_is_refused(paths):
    with pytest.raises(ConfigError, match="newer version"):
        config.from_dict({**paths, "config_version": config.CONFIG_VERSION + 1})


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlearning_rate = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "missing.toml")


def test_bad_override_syntax(tmp_path, paths):
    path = tmp_path / "c.toml"
    config.save(config.from_dict(paths), path)
    with pytest.raises(ConfigError, match="expected section.key=value"):
        config.load(path, ["learning_rate=1"])


def test_model_path_may_be_a_single_file_checkpoint(paths, tmp_path):
    ckpt = tmp_path / "my model.safetensors"
    ckpt.write_bytes(b"x")
    assert config.from_dict({**paths, "model": {"path": str(ckpt)}}).model.path == str(ckpt)
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(ConfigError, match="is a file but not a checkpoint"):
        config.from_dict({**paths, "model": {"path": str(other)}})


def test_a_config_is_validated_once_per_process_on_the_way_to_training(paths, tmp_path, monkeypatch):
    """The form (or the CLI) validates; copying the paths and starting the run trust it."""
    from core.training import train

    calls = []
    real = config.validate
    monkeypatch.setattr(config, "validate", lambda cfg, **kw: (calls.append(1), real(cfg, **kw))[1])
    cfg = config.from_dict({**paths, "output": {"dir": str(tmp_path / "out")}})
    assert len(calls) == 1
    resolved = config.resolve_paths(cfg)
    assert resolved is not cfg and resolved.lora is not cfg.lora and len(calls) == 1
    monkeypatch.setattr(train, "check_run_dir", lambda *a: (_ for _ in ()).throw(RuntimeError("stop here")))
    with pytest.raises(RuntimeError, match="stop here"):
        train.run(cfg, lambda event: None)
    assert len(calls) == 1


def test_group_offloading_needs_the_full_base_and_checkpointing(paths):
    config.from_dict({**paths, "model": {**paths.get("model", {}), "group_offload": True}})  # the defaults allow it
    for other in ({"model": {"quantize": "nf4"}}, {"train": {"gradient_checkpointing": False}}):
        raw = {**paths, **{k: {**paths.get(k, {}), **v} for k, v in other.items()}}
        raw["model"] = {**raw.get("model", {}), "group_offload": True}
        with pytest.raises(ConfigError, match="model.group_offload = true needs model.quantize = 'none'"):
            config.from_dict(raw)
