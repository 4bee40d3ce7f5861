"""Resume at the edges of the run skeleton (`prefalign.trainers.run.Run`): a checkpoint past the new budget, a
longer budget's schedule, the wall clock, a checkpoint copied outside the run, a run resumed at its end; and what a
run writes: file modes, an adapter's base. Each case failed before its fix."""

import json
import os
import shutil
import signal
import stat
import time

import pytest
from conftest import read_metrics, trainer_kwargs

from prefalign.errors import UserError
from prefalign.trainers.dpo import DPOConfig, DPOTrainer
from prefalign.trainers.guard import StopRequested


def _cfg(tmp_path, model, pairs, **kw):
    return DPOConfig(**trainer_kwargs(tmp_path, model, pairs, **kw))


def test_a_checkpoint_past_the_new_budget_is_refused(tmp_path, tiny_model_dir, pairs):
    DPOTrainer(_cfg(tmp_path, tiny_model_dir, pairs, max_steps=4, save_steps=2)).train()
    shutil.rmtree(tmp_path / "run" / "final")
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match=r"a checkpoint at step 4, past this run's last \(2\); resume with a budget"):
        DPOTrainer(_cfg(tmp_path, tiny_model_dir, pairs, max_steps=2, save_steps=2, resume="latest")).train()
    assert not (tmp_path / "run" / "final").exists() and (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_a_longer_budget_takes_the_new_schedule_from_the_first_resumed_step(tmp_path, tiny_model_dir, pairs):
    kw = dict(lr_scheduler="linear", save_steps=2)
    DPOTrainer(_cfg(tmp_path / "whole", tiny_model_dir, pairs, max_steps=8, **kw)).train()
    DPOTrainer(_cfg(tmp_path / "cut", tiny_model_dir, pairs, max_steps=4, **kw)).train()
    shutil.rmtree(tmp_path / "cut" / "run" / "checkpoints" / "step-0000004")
    shutil.rmtree(tmp_path / "cut" / "run" / "final")
    DPOTrainer(_cfg(tmp_path / "cut", tiny_model_dir, pairs, max_steps=8, resume="latest", **kw)).train()
    whole = [r["lr"] for r in read_metrics(tmp_path / "whole" / "run")]
    extended = [r["lr"] for r in read_metrics(tmp_path / "cut" / "run")]
    # steps 1-2 ran on the 4-step schedule (1e-3, 7.5e-4); step 3 on the 8-step one: 1e-3 x 6/8, not x 2/4
    assert extended[:2] == pytest.approx([1e-3, 7.5e-4]) and extended[2:] == pytest.approx(whole[2:])


def test_the_wall_clock_goes_on_from_the_checkpoint_not_the_last_row(tmp_path, tiny_model_dir, pairs):
    class Slow(DPOTrainer):
        def train_step(self, step):
            time.sleep(0.5)
            super().train_step(step)

    kw = dict(max_steps=4, save_steps=3, logging_steps=2, save_total_limit=5)  # step 3's checkpoint: no row
    Slow(_cfg(tmp_path, tiny_model_dir, pairs, **kw)).train()
    whole = {r["step"]: r["wall_seconds"] for r in read_metrics(tmp_path / "run")}
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000004")
    shutil.rmtree(tmp_path / "run" / "final")
    saved = json.loads((tmp_path / "run" / "checkpoints" / "step-0000003" / "state.json").read_text())
    assert saved["wall_seconds"] >= whole[2] + 0.5  # step 3 ran after row 2
    Slow(_cfg(tmp_path, tiny_model_dir, pairs, resume="latest", **kw)).train()
    resumed = {r["step"]: r["wall_seconds"] for r in read_metrics(tmp_path / "run")}
    assert resumed[4] >= saved["wall_seconds"] + 0.5  # the clock went on from step 3's, not from row 2's


def test_a_checkpoint_copied_elsewhere_drops_the_run_s_later_ones(tmp_path, tiny_model_dir, pairs):
    """Resumed from a copy of step 2 while the run's own directory holds steps 4 and 6: those are abandoned, or
    pruning (--save-total-limit 1) would keep step 6 over the step-3 checkpoint this run writes on SIGTERM."""
    DPOTrainer(_cfg(tmp_path, tiny_model_dir, pairs, max_steps=6, save_steps=2, save_total_limit=3)).train()
    shutil.rmtree(tmp_path / "run" / "final")
    copy = tmp_path / "copy" / "step-0000002"
    shutil.copytree(tmp_path / "run" / "checkpoints" / "step-0000002", copy)

    class TermAt3(DPOTrainer):
        def batch_for(self, step, micro):
            if step == 2 and micro == 0:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().batch_for(step, micro)

    cfg = _cfg(tmp_path, tiny_model_dir, pairs, max_steps=6, save_steps=2, save_total_limit=1, resume=str(copy))
    with pytest.raises(StopRequested, match="stopped after step 3 of 6"):
        TermAt3(cfg).train()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000003"]


def test_a_run_resumed_at_its_end_returns_its_last_metrics_and_writes_readable_files(tmp_path, tiny_model_dir, pairs):
    whole = DPOTrainer(_cfg(tmp_path, tiny_model_dir, pairs, max_steps=2, save_steps=1)).train()
    shutil.rmtree(tmp_path / "run" / "final")
    resumed = DPOTrainer(_cfg(tmp_path, tiny_model_dir, pairs, max_steps=2, save_steps=1, resume="latest")).train()
    assert resumed == whole and "loss" in resumed
    mask = os.umask(0)
    os.umask(mask)
    run = tmp_path / "run"
    for path, mode in [
        (run / "config.yaml", 0o666),
        (run / "run.json", 0o666),
        (run / "final", 0o777),
        (run / "final" / "model.safetensors", 0o666),  # safetensors writes 0600
        (run / "checkpoints" / "step-0000002", 0o777),
        (run / "checkpoints" / "step-0000002" / "state.json", 0o666),
    ]:
        assert stat.S_IMODE(os.stat(path).st_mode) == mode & ~mask, path  # not mkstemp's 0600 / mkdtemp's 0700


@pytest.mark.parametrize("main", [True, False], ids=["main", "other"])
def test_resumed_running_stats_give_every_process_the_same_keys(main):
    """The next row pools the stats in one all-reduce over each process's keys: the saved sums go to the main
    process, the other processes hold the same keys at zero (with different keys, a row after steps all skipped as
    non-finite called different collectives on different processes and hung)."""
    from types import SimpleNamespace

    from prefalign.trainers.loop import Trainer
    from prefalign.trainers.metrics import RunningMean

    fake = SimpleNamespace(accelerator=SimpleNamespace(is_main_process=main), running=RunningMean())
    Trainer.load_state(
        fake, {"running": {"sums": {"loss": 2.0, "grad_norm": 3.0}, "counts": {"loss": 4.0, "grad_norm": 1.0}}}
    )
    got = (dict(fake.running.sums), dict(fake.running.counts))
    assert got == (
        ({"loss": 2.0, "grad_norm": 3.0}, {"loss": 4.0, "grad_norm": 1.0})
        if main
        else ({"loss": 0.0, "grad_norm": 0.0}, {"loss": 0.0, "grad_norm": 0.0})
    )


def test_an_adapter_names_its_local_base_by_absolute_path(tmp_path, tiny_model_dir, pairs, monkeypatch):
    """--model given as a relative directory: final/ loaded only from the run's working directory."""
    from prefalign.models.loading import load_policy

    shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path)
    cfg = DPOConfig(**trainer_kwargs(tmp_path, "models/tiny", pairs, max_steps=1, lora_r=2))
    DPOTrainer(cfg).train()
    adapter = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((tmp_path / "models" / "tiny").resolve())
    monkeypatch.chdir("/")
    assert load_policy(str(tmp_path / "run" / "final")) is not None


def test_a_stale_final_temp_directory_is_removed_by_the_next_write(tmp_path, tiny_model_dir, pairs):
    """A kill while final/ was being written left .tmp-final-*; the next final/ write removes it."""
    DPOTrainer(_cfg(tmp_path, tiny_model_dir, pairs, max_steps=1, save_steps=1)).train()
    stale = tmp_path / "run" / ".tmp-final-killed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    shutil.rmtree(tmp_path / "run" / "final")
    DPOTrainer(_cfg(tmp_path, tiny_model_dir, pairs, max_steps=1, save_steps=1, resume="latest")).train()
    assert not stale.exists() and (tmp_path / "run" / "final" / "config.json").is_file()


def test_checkpoints_order_by_step_number_past_seven_digits(tmp_path):
    from prefalign.trainers.checkpoint import CheckpointManager

    manager = CheckpointManager(tmp_path, 2)
    for name in ("step-9999999", "step-10000000", "step-0000002"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / "state.json").write_text("{}")
    assert [p.name for p in manager.complete()] == ["step-0000002", "step-9999999", "step-10000000"]


def test_the_clock_goes_on_from_the_checkpoint_into_a_fresh_output(tmp_path, tiny_model_dir, pairs):
    """Resumed from a checkpoint elsewhere into an --output without metrics.jsonl: wall_seconds went back to 0."""
    DPOTrainer(_cfg(tmp_path / "a", tiny_model_dir, pairs, max_steps=3, save_steps=2)).train()
    ckpt = tmp_path / "a" / "run" / "checkpoints" / "step-0000002"
    saved = json.loads((ckpt / "state.json").read_text())["wall_seconds"]
    DPOTrainer(_cfg(tmp_path / "b", tiny_model_dir, pairs, max_steps=3, save_steps=2, resume=str(ckpt))).train()
    assert read_metrics(tmp_path / "b" / "run")[0]["wall_seconds"] >= saved > 0
