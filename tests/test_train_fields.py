"""The Train tab's Advanced settings, one fold per topic."""

from ui import train_fields


def test_every_advanced_field_is_in_exactly_one_topic():
    grouped = [key for _, keys in train_fields.advanced_groups() for key in keys]
    assert sorted(grouped) == sorted(train_fields.advanced_fields())
    assert len(grouped) == len(set(grouped))
    topics = dict(train_fields.advanced_groups())
    assert list(topics) == list(train_fields.ADVANCED_GROUPS)
    assert "lora.type" in topics["LoRA"] and "train.loss_type" in topics["Noise and loss"]
    assert "train.optimizer" in topics["Optimizer"] and "model.quantize" in topics["Memory"]
    assert "dataset.masked_loss" in topics["Data"] and "output.tensorboard" in topics["Saving"]
    assert "sample.steps" in topics["Samples and validation"] and "model.clip_skip" in topics["Model"]
    assert train_fields.group_id("Noise and loss") == "train-advanced-noise-loss"
