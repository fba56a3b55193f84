"""recommend: the checkpoint by validation loss (files on disk only), strengths judged by pictures, outputs, CLI.

One tiny run is trained (validation and saves every 2 steps, EMA on, a high learning rate so the LoRA visibly
changes the pictures); the other cases are copies of it whose events or files are edited, so the expected
pick is known exactly.
"""

import argparse
import json
import math
import shutil

import pytest
from PIL import Image

from core.events import jsonl_writer
from core.training.recommend import Cell, Checkpoint, RecommendError, pick_winner, recommend
from tests.conftest import EventLog, tiny_config, write_dataset

NAME = "rec"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model runs many small ops: on a busy 2-core machine, torch's thread pool makes them far slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model):
    from core.training import train

    root = tmp_path_factory.mktemp("recommend")
    data = write_dataset(root / "pictures", n=6)
    cfg = tiny_config(tiny_model, data, root / "outputs", name=NAME,
                      **{"sample.prompts": [], "sample.every_n_steps": 2, "output.save_every_n_steps": 2,
                         "train.learning_rate": 1e-2, "train.ema": True, "output.save_precision": "fp32",
                         "output.trigger_phrase": "sks"})
    result = train.run(cfg, jsonl_writer(cfg.run_dir / "events.jsonl"))
    assert result.status == "completed"
    return cfg.run_dir


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from core.training.image_scores import write_tiny_clip

    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def copy_run(run, dest, name=NAME):
    """A copy of the run folder named ``name`` (its LoRA files renamed to match), without resume state."""
    target = dest / name
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("state", "samples", "recommendation.*"))
    if name != NAME:
        for path in target.glob(f"{NAME}*.safetensors"):
            path.rename(target / path.name.replace(NAME, name, 1))
    return target


def edit_events(run_dir, keep=lambda e: True, losses=None, ema=False):
    """Rewrite events.jsonl: drop events ``keep`` rejects; set validation losses {step: loss} (live or EMA)."""
    path = run_dir / "events.jsonl"
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for e in events:
        if losses and e["type"] == "validation_loss" and e["ema"] == ema and e["step"] in losses:
            e["loss"] = losses[e["step"]]
    path.write_text("".join(json.dumps(e) + "\n" for e in events if keep(e)))


def live_losses(run_dir):
    from core.events import ValidationLoss, read_typed

    events, _ = read_typed(run_dir / "events.jsonl")
    return {e.step: e.loss for e in events if isinstance(e, ValidationLoss) and not e.ema}


def test_the_lowest_validation_loss_with_a_file_is_chosen(run):
    losses = live_losses(run)
    assert sorted(losses) == [0, 2, 4, 6]
    expected = min((2, 4, 6), key=losses.get)  # step 0 is the base model: no file
    rec = recommend(run, strengths=(), write=False)
    assert rec.step == expected and rec.loss_kind == "live" and rec.strength == 1.0
    assert rec.validation_loss == pytest.approx(losses[expected])
    assert "-ema" not in rec.lora_path and "lowest validation loss" in rec.reasons[0]
    assert [c.step for c in rec.ranked] == sorted((2, 4, 6), key=losses.get)


def test_an_earlier_step_with_lower_loss_beats_the_final_file(run, tmp_path):
    copy = copy_run(run, tmp_path)
    edit_events(copy, losses={0: 2.0, 2: 0.5, 4: 0.9, 6: 0.8})
    rec = recommend(copy, strengths=(), write=False)
    assert rec.step == 2 and rec.lora_path == str(copy / f"{NAME}-step000002.safetensors")
    assert "0.5000 at step 2" in rec.reasons[0] and "of 3 checkpoints" in rec.reasons[0]


def test_a_pruned_best_step_gives_the_best_step_that_has_a_file(run, tmp_path):
    copy = copy_run(run, tmp_path)
    edit_events(copy, losses={0: 2.0, 2: 0.5, 4: 0.6, 6: 0.9})
    (copy / f"{NAME}-step000002.safetensors").unlink()
    rec = recommend(copy, strengths=(), write=False)
    assert rec.step == 4 and rec.lora_path.endswith(f"{NAME}-step000004.safetensors")
    assert "step 2 had a lower loss (0.5000) but has no LoRA file on disk" in rec.reasons[0]


def test_the_base_model_scoring_better_is_said(run, tmp_path):
    copy = copy_run(run, tmp_path)
    edit_events(copy, losses={0: 0.1, 2: 0.5, 4: 0.6, 6: 0.9})
    rec = recommend(copy, strengths=(), write=False)
    assert rec.step == 2 and "the base model (step 0) scored 0.1000" in rec.reasons[0]


def test_only_ema_losses_recommend_the_ema_file(run, tmp_path):
    copy = copy_run(run, tmp_path)
    edit_events(copy, keep=lambda e: not (e["type"] == "validation_loss" and not e["ema"]),
                losses={2: 0.3, 4: 0.4, 6: 0.5}, ema=True)
    rec = recommend(copy, strengths=(), write=False)
    assert rec.loss_kind == "ema" and rec.step == 2
    assert rec.lora_path == str(copy / f"{NAME}-ema-step000002.safetensors")
    assert "EMA" in rec.reasons[0]


def test_a_run_without_validation_falls_back_to_the_final_file(run, tmp_path):
    copy = copy_run(run, tmp_path)
    edit_events(copy, keep=lambda e: e["type"] != "validation_loss")
    rec = recommend(copy, strengths=(), write=True)
    assert rec.lora_path == str(copy / f"{NAME}.safetensors") and rec.step == 6
    assert rec.validation_loss is None and rec.loss_kind == "none"
    assert "no validation loss" in rec.reasons[0] and "final file" in rec.reasons[0]
    saved = json.loads((copy / "recommendation.json").read_text())
    assert saved["lora_path"] == rec.lora_path and not (copy / "recommendation.png").exists()


def test_a_sweep_ranks_the_checkpoints_of_all_runs(run, tmp_path):
    a, b = copy_run(run, tmp_path, "sweep-a"), copy_run(run, tmp_path, "sweep-b")
    edit_events(a, losses={2: 0.6, 4: 0.5, 6: 0.55})
    edit_events(b, losses={2: 0.7, 4: 0.4, 6: 0.45})
    rec = recommend([a, b], strengths=(), write=True)
    assert rec.run_dir == str(b) and rec.step == 4 and rec.lora_path.endswith("sweep-b-step000004.safetensors")
    assert "of run sweep-b" in rec.reasons[0] and "of 6 checkpoints" in rec.reasons[0]
    assert [(c.run, c.step) for c in rec.ranked[:3]] == [(str(b), 4), (str(b), 6), (str(a), 4)]
    assert (b / "recommendation.json").is_file() and not (a / "recommendation.json").exists()


def test_bad_input_is_refused_with_a_clear_reason(run, tmp_path):
    with pytest.raises(RecommendError, match="no run folder"):
        recommend(tmp_path / "missing", strengths=())
    unfinished = copy_run(run, tmp_path / "u")
    edit_events(unfinished, keep=lambda e: e["type"] != "finished")
    with pytest.raises(RecommendError, match="has not finished"):
        recommend(unfinished, strengths=())
    empty = copy_run(run, tmp_path / "e")
    for path in empty.glob("*.safetensors"):
        path.unlink()
    with pytest.raises(RecommendError, match="no LoRA files"):
        recommend(empty, strengths=())
    with pytest.raises(RecommendError, match="0 or more"):
        recommend(run, strengths=(-1,))
    other = copy_run(run, tmp_path / "o")
    config = other / "config.toml"
    config.write_text(config.read_text().replace("[model]\npath = ", "[model]\npath = \"/elsewhere\"\n#"))
    with pytest.raises(RecommendError, match="different base models"):
        recommend([run, other], strengths=())


def _cli(*args) -> int:
    from core.cli_recommend import add_command

    parser = argparse.ArgumentParser(prog="python -m core")
    add_command(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args(["recommend", *map(str, args)])
    return parsed.func(parsed)


def test_cli_refuses_bad_input_with_exit_code_2(run, tmp_path, capsys):
    assert _cli(tmp_path / "missing") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no run folder") and err.count("\n") == 1
    assert _cli(run, "--strengths", "0.5,x") == 2
    assert "'x' is not a number" in capsys.readouterr().err
    assert _cli(run, "--clip", tmp_path / "no-clip", "--strengths", "1") == 2
    assert "CLIP model" in capsys.readouterr().err


def test_cli_prints_json_and_writes_progress_events(run, tmp_path, capsys):
    copy = copy_run(run, tmp_path)
    events = tmp_path / "events.jsonl"
    assert _cli(copy, "--strengths", "1", "--steps", "1", "--checkpoints", "1", "--json", "--events", events,
                "--leak-prompt", "a landscape") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["strength"] == 1.0 and len(out["cells"]) == len(out["checkpoints"]) >= 1
    assert all(cell["pixel_leakage"] > 0 for cell in out["cells"])
    assert out["settings"]["steps"] == 1 and out["settings"]["leak_prompts"] == ["a landscape"]
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    grid = [(e["done"], e["total"]) for e in lines if e.get("name") == "grid"]
    assert grid == [(i, len(out["cells"])) for i in range(1, len(out["cells"]) + 1)]
    assert (copy / "recommendation.png").is_file()


@pytest.fixture(scope="module")
def clip_grid(run, tiny_clip):
    log = EventLog()
    rec = recommend(run, strengths=(0, 0.5, 1.0), clip_model=str(tiny_clip), checkpoints=2,
                    leak_prompts=("a photo of a dog",), emit=log, device="cpu")
    return rec, log


def test_clip_scores_every_cell_and_leakage_grows_with_strength(clip_grid, tiny_clip):
    rec, log = clip_grid
    rows = len(rec.checkpoints)
    assert rows == 2 and len(rec.cells) == rows * 3
    assert rec.settings["prompts"] == ["a photo of sks"]  # no sample prompts: the trigger phrase's
    for cell in rec.cells:
        for value in (cell.likeness, cell.adherence, cell.adherence_change, cell.leakage, cell.pixel_leakage):
            assert value is not None and math.isfinite(value)
    for row in range(rows):
        cells = [c for c in rec.cells if c.checkpoint == row]
        assert cells[0].strength == 0 and cells[0].leakage == pytest.approx(0, abs=1e-6)
        assert cells[0].pixel_leakage == 0 and cells[0].adherence_change == pytest.approx(0, abs=1e-6)
        assert 0 < cells[1].pixel_leakage < cells[2].pixel_leakage
        assert 0 < cells[1].leakage < cells[2].leakage
    grid = [(e.done, e.total) for e in log.of("phase") if e.name == "grid"]
    assert grid == [(i, rows * 3) for i in range(1, rows * 3 + 1)]
    assert rec.winner is not None and rec.cells[rec.winner].acceptable and rec.strength > 0
    assert rec.clip_model == str(tiny_clip) and "likeness" in rec.reasons[-1]


def test_json_and_picture_are_written_and_readable(clip_grid, run, tiny_clip):
    rec, _ = clip_grid
    assert rec.json_path == str(run / "recommendation.json") and rec.image_path == str(run / "recommendation.png")
    saved = json.loads((run / "recommendation.json").read_text())
    assert saved["lora_path"] == rec.lora_path and saved["strength"] == rec.strength
    assert saved["winner"] == rec.winner and len(saved["cells"]) == len(rec.cells)
    assert saved["reasons"] == rec.reasons and saved["settings"]["clip_model"] == str(tiny_clip)
    assert set(saved["cells"][0]) >= {"likeness", "adherence", "adherence_change", "leakage", "pixel_leakage"}
    with Image.open(run / "recommendation.png") as picture:
        picture.load()
        assert picture.width >= 230 + 3 * 256 and picture.height >= 256 * len(rec.checkpoints)
        pixels = picture.convert("RGB").tobytes()
    framed = sum(1 for i in range(0, len(pixels), 3) if pixels[i:i + 3] == bytes((0, 160, 0)))
    assert framed > 1000, "the winner is not framed"


def _cells(*rows):
    """Cells from (row, strength, likeness, adherence_change, leakage, pixel_leakage)."""
    return [Cell(r, s, likeness=lk, adherence=0.3, adherence_change=ad, leakage=le, pixel_leakage=px)
            for r, s, lk, ad, le, px in rows]


def test_the_winner_rule():
    rows = [Checkpoint("run", 4, "a", 0.5, label="step 4"), Checkpoint("run", 6, "b", 0.6, label="step 6")]
    cells = _cells((0, 0.5, 0.70, 0.0, 0.02, 0.01), (0, 1.0, 0.80, -0.03, 0.03, 0.02),  # adherence drops 3 %
                   (1, 0.5, 0.75, -0.01, 0.05, 0.03), (1, 1.0, 0.90, 0.0, 0.20, 0.05))  # leaks
    win, reason = pick_winner(cells, rows, clip=True, tolerance=0.02, threshold=0.10)
    assert win == 2 and [c.acceptable for c in cells] == [True, False, True, False]
    assert "highest likeness 0.750" in reason and "step 6" in reason
    win, reason = pick_winner(cells, rows, clip=False, tolerance=0.02, threshold=0.015)
    assert win == 0 and "highest strength" in reason  # without CLIP: the validation pick's row, pixel leakage
    win, reason = pick_winner(cells, rows, clip=True, tolerance=0.0, threshold=0.001)
    assert win == 0 and "no strength met the rule" in reason
