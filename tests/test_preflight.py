"""Preflight (prefalign/preflight.py): a run or a race that cannot fit on the disk of --output is refused in one
line before anything is written; one whose models may not fit in memory gets a one-line warning."""

import logging
import shutil
from collections import namedtuple

import pytest
from conftest import trainer_kwargs

from prefalign import preflight
from prefalign.errors import UserError
from prefalign.preflight import (
    CHECKPOINT_BYTES,
    WEIGHT_BYTES,
    TrainedModel,
    check_disk,
    checkpoints_on_disk,
    race_bytes,
    run_disk_bytes,
    training_memory_bytes,
)

DiskUsage = namedtuple("DiskUsage", "total used free")


def fake_free_disk(monkeypatch, free: int):
    """Every disk has ``free`` bytes free."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(10**12, 10**12 - free, free))


# ------------------------------------------------------------------ the estimates
@pytest.mark.parametrize(
    "save_steps,limit,total,want",
    [
        (None, 2, 100, 1),  # only the end's checkpoint
        (10, 2, 100, 3),  # the limit, + the newest written before the oldest goes
        (10, 5, 20, 2),  # fewer written than the limit keeps
        (10, 2, None, 3),  # run length unknown before build: the limit bounds it
        (7, 9, 20, 3),  # steps 7, 14 and the end
    ],
)
def test_checkpoints_on_disk(save_steps, limit, total, want):
    assert checkpoints_on_disk(save_steps, limit, total) == want


def test_run_disk_bytes_counts_checkpoints_and_final_weights():
    full = TrainedModel(trainable=100, total=100, lora=False)
    assert run_disk_bytes([full], checkpoints=3, merge_lora=False) == 3 * 100 * 12 + 100 * 4
    lora = TrainedModel(trainable=10, total=110, lora=True)  # 100 frozen base parameters
    assert run_disk_bytes([lora], checkpoints=2, merge_lora=False) == 2 * 10 * 12 + 10 * 4
    assert run_disk_bytes([lora], checkpoints=2, merge_lora=True) == 2 * 10 * 12 + (10 + 100) * 4
    ppo = [full, full]  # policy and value model: both checkpointed, final/ and value/
    assert run_disk_bytes(ppo, checkpoints=1, merge_lora=False) == 2 * (100 * 12 + 100 * 4)


def test_training_memory_counts_gradients_and_adam_for_trainable_weights_only():
    lora = TrainedModel(trainable=10, total=110, lora=True)
    assert training_memory_bytes([lora], frozen=50) == 10 * 16 + (100 + 50) * 4


def test_race_bytes_keeps_every_final_and_one_checkpoint_at_a_time():
    p = 1000
    disk, memory = race_bytes(["prefs", "reward", "ppo", "dpo", "eval"], p)
    finals = (1 + 2 + 1) * p * WEIGHT_BYTES  # rm/final, ppo/final + ppo/value, dpo/final
    assert disk == finals + 2 * p * CHECKPOINT_BYTES  # the largest stage checkpoint: PPO's two models
    assert memory == 2 * p * 16 + 2 * p * 4  # PPO: policy and value trained, reference and reward model frozen


@pytest.mark.parametrize("targets", [["all-linear"], ["q_proj", "v_proj"]])
def test_lora_estimate_equals_what_peft_adds(tiny_model, targets):
    from peft import LoraConfig, get_peft_model

    from prefalign.preflight import lora_parameters

    want = lora_parameters(tiny_model, 4, targets)
    model = get_peft_model(
        tiny_model,
        LoraConfig(r=4, target_modules="all-linear" if targets == ["all-linear"] else targets, task_type="CAUSAL_LM"),
    )
    assert want == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


# ------------------------------------------------------------------ the disk check
def test_check_disk_counts_what_the_output_holds_already(tmp_path, monkeypatch):
    """A resumed (or overwritten) run reuses the space of the files already in --output."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.bin").write_bytes(b"x" * 1000)
    fake_free_disk(monkeypatch, 150)
    check_disk(out, 1100, "this run", "write less")  # 100 more bytes: fits
    with pytest.raises(
        UserError,
        match=r"^--output .*run: this run needs about 0.0 MiB more on its disk, which "
        r"has 0.0 MiB free; free some space, choose another --output, or write less$",
    ):
        check_disk(out, 1200, "this run", "write less")
    check_disk(tmp_path / "not" / "yet", 100, "this run", "write less")  # measured on its nearest existing parent


def test_a_run_that_cannot_fit_is_refused_in_one_line_and_writes_nothing(
    tmp_path, tiny_model_dir, pairs, monkeypatch, capsys
):
    from prefalign.cli import main

    fake_free_disk(monkeypatch, 1000)
    out = tmp_path / "run"
    code = main(
        [
            "dpo",
            "--data",
            str(pairs),
            "--model",
            str(tiny_model_dir),
            "--output",
            str(out),
            "--batch-size",
            "4",
            "--max-steps",
            "4",
            "--save-steps",
            "1",
            "--precision",
            "fp32",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(f"error: --output {out}: this run (3 checkpoints and its final weights) needs about ")
    assert err[-1].endswith(
        "MiB more on its disk, which has 0.0 MiB free; free some space, choose another --output, "
        "or keep fewer checkpoints (--save-total-limit) or train a LoRA adapter (--lora-r)"
    )
    assert not out.exists()


def test_a_run_that_fits_is_not_refused(tmp_path, tiny_model_dir, pairs, monkeypatch):
    """The tiny model's DPO run with 3 checkpoints at once needs under 100 MiB."""
    from prefalign.trainers.dpo import DPOConfig, DPOTrainer

    fake_free_disk(monkeypatch, 100 * 2**20)
    DPOTrainer(DPOConfig(**trainer_kwargs(tmp_path, tiny_model_dir, pairs, max_steps=2, save_steps=1))).train()
    assert (tmp_path / "run" / "final").is_dir()


def test_a_race_that_cannot_fit_is_refused_before_its_directory_exists(tmp_path, tiny_model_dir, monkeypatch):
    from prefalign.compare import CompareConfig, Comparison

    fake_free_disk(monkeypatch, 1000)
    out = tmp_path / "race"
    cfg = CompareConfig(preset="quick", model=str(tiny_model_dir), arms=["ppo", "dpo"], output=str(out))
    with pytest.raises(
        UserError,
        match=r"^--output .*race: this race \(5 stages\) needs about .* MiB more on its "
        r"disk, .* or race fewer --arms or --seeds$",
    ):
        Comparison(cfg).run()
    assert not out.exists()


# ------------------------------------------------------------------ the memory warning
def test_a_run_that_may_not_fit_in_memory_is_warned_once(tmp_path, tiny_model_dir, pairs, monkeypatch, caplog):
    from prefalign.trainers.dpo import DPOConfig, DPOTrainer

    monkeypatch.setattr(preflight, "available_memory_bytes", lambda device_type="cpu": 0)
    with caplog.at_level(logging.WARNING, logger="prefalign.preflight"):
        DPOTrainer(DPOConfig(**trainer_kwargs(tmp_path, tiny_model_dir, pairs, max_steps=1))).train()
    warned = [r.getMessage() for r in caplog.records if r.name == "prefalign.preflight"]
    assert len(warned) == 1 and "\n" not in warned[0]
    assert warned[0].startswith("this run may not fit in memory: about ")
    assert "MiB available; a LoRA adapter (--lora-r)" in warned[0]
    assert (tmp_path / "run" / "final").is_dir()  # a warning, not a refusal


def test_a_race_warns_when_its_largest_stage_may_not_fit(tmp_path, tiny_model_dir, monkeypatch, caplog):
    monkeypatch.setattr(preflight, "available_memory_bytes", lambda device_type="cpu": 1000)
    with caplog.at_level(logging.WARNING, logger="prefalign.preflight"):
        preflight.preflight_race(tmp_path / "race", ["prefs", "reward", "ppo", "eval"], str(tiny_model_dir))
    [warned] = [r.getMessage() for r in caplog.records if r.name == "prefalign.preflight"]
    assert warned.startswith("its largest stage may not fit in memory") and warned.endswith("race a smaller --model")


def test_no_warning_when_memory_is_plentiful(tmp_path, tiny_model_dir, caplog):
    """The tiny model fits in what any test machine has free."""
    assert preflight.available_memory_bytes() > 0
    with caplog.at_level(logging.WARNING, logger="prefalign.preflight"):
        preflight.preflight_race(tmp_path / "race", ["prefs", "reward", "ppo", "eval"], str(tiny_model_dir))
    assert not [r for r in caplog.records if r.name == "prefalign.preflight"]
