"""output.tensorboard: accelerate's TensorBoard tracker gets the losses, learning rate, validation and samples."""

import pytest
from conftest import EventLog, tiny_config, write_dataset


def test_a_run_logs_to_tensorboard(tiny_model, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from core.training import train

    cfg = tiny_config(tiny_model, write_dataset(tmp_path / "d", n=4), tmp_path / "out", **{
        "output.tensorboard": True, "train.max_train_steps": 4, "sample.every_n_steps": 2, "train.ema": True,
        "output.save_state": False})
    log = EventLog()
    result = train.run(cfg, log)
    assert result.status == "completed"
    assert any("tensorboard --logdir" in e.text for e in log.of("message"))
    runs = [p.parent for p in (result.run_dir / "tensorboard").rglob("events.out.tfevents.*")]
    assert runs
    found = EventAccumulator(str(runs[0]), size_guidance={"images": 0, "scalars": 0})
    found.Reload()
    tags = found.Tags()
    assert {"loss", "learning_rate", "validation_loss", "validation_loss_ema"} <= set(tags["scalars"])
    assert [e.step for e in found.Scalars("loss")] == [1, 2, 3, 4]
    losses = {e.step: e.value for e in found.Scalars("validation_loss")}
    reported = {e.step: e.loss for e in log.of("validation_loss") if not e.ema}
    assert losses.keys() == reported.keys() and all(abs(losses[s] - reported[s]) < 1e-5 for s in losses)
    assert "sample 0" in tags["images"] and "sample 0 (EMA)" in tags["images"]
