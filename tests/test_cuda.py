"""GPU paths (skipped by default; run with `python -m pytest -m cuda` on a machine with an NVIDIA GPU)."""

import pytest
import torch

from core.training import train
from tests.conftest import EventLog, tiny_config, write_dataset

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_on_gpu(precision, tiny_model, tmp_path):
    cfg = tiny_config(tiny_model, write_dataset(tmp_path / "d", n=4), tmp_path / "o", name=precision,
                      **{"train.mixed_precision": precision, "train.gradient_checkpointing": True,
                         "train.max_train_steps": 4, "lora.train_text_encoder": True})
    log = EventLog()
    result = train.run(cfg, log, keep_models=True)
    assert result.status == "completed"
    assert log.of("run_started")[0].device.startswith("cuda")
    params = dict(result.denoiser.named_parameters())
    assert {p.dtype for n, p in params.items() if "lora_" in n} == {torch.float32}
    assert all(torch.isfinite(torch.tensor(e.loss)) for e in log.of("progress"))
    assert [e.step for e in log.of("sample")] == [0, 3, 4]
    assert not any(e.type == "message" and e.level == "warning" for e in log.events)  # 8-bit AdamW ran


@pytest.mark.parametrize("family,resolution", [("sd1", 512), ("sdxl", 1024)])
def test_the_memory_estimate_matches_the_gpu(family, resolution):
    """A real step of the reference architecture on the GPU against the fake-tensor measurement and the
    planner's estimate (allocated bytes, before the margins for context and workspace)."""
    from core import config as config_mod
    from core.base.architecture import reference
    from core.training import plan as planner
    from core.training.memory import StepShape, measure_step, measure_step_cuda

    arch, shape = reference(family), StepShape(resolution, 1, "bf16", True)
    cuda = measure_step_cuda(arch, shape)
    fake = measure_step(arch, shape)
    assert cuda.unet_weights == fake.unet_weights
    assert cuda.step == pytest.approx(fake.step, rel=0.15)
    config = config_mod.with_values(config_mod.TrainConfig(), {
        "model.family": family, "dataset.resolution": resolution, "train.mixed_precision": "bf16",
        "train.gradient_checkpointing": True})
    training = planner.estimate(config, arch).phases["training"]
    estimated = sum(v for k, v in training.items() if k != "optimizer")
    assert estimated == pytest.approx(cuda.unet_weights + cuda.lora + cuda.step, rel=0.15)


def test_group_offloading_on_the_gpu_trains_the_same_lora_in_less_memory(tiny_model, tmp_path):
    """The linear weights come to the card one layer at a time: the same LoRA (up to the order of float
    sums), less memory allocated at the peak, and the final check loads the model offloaded too."""
    from safetensors.torch import load_file

    data = write_dataset(tmp_path / "d", n=4)
    files, peaks = {}, {}
    for offload in (False, True):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cfg = tiny_config(tiny_model, data, tmp_path / f"o-{offload}",
                          **{"model.group_offload": offload, "train.gradient_checkpointing": True,
                             "train.max_train_steps": 4, "sample.prompts": []})
        result = train.run(cfg, EventLog(), final_check=True)
        files[offload], peaks[offload] = load_file(result.lora_path), torch.cuda.max_memory_allocated()
    torch.testing.assert_close(files[True], files[False], rtol=1e-3, atol=1e-5)
    assert peaks[True] < peaks[False]
