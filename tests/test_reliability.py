"""Never lose a run: kills, signals, corrupted checkpoints, non-finite steps."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import learnable_pairs, nan_at_trainer, read_metrics, trainer_kwargs, write_jsonl
from safetensors.torch import load_file

from prefalign.errors import UserError
from prefalign.trainers.dpo import DPOConfig, DPOTrainer


def _start(args, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "prefalign", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for_step(proc, out, step, timeout=240):
    """Block until metrics.jsonl in ``out`` has a row with step >= ``step``."""
    deadline = time.time() + timeout
    path = out / "metrics.jsonl"
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"finished before step {step}: {proc.stderr.read()[-2000:]}")
        if path.exists():
            steps = [json.loads(x).get("step", 0) for x in path.read_text().splitlines() if x.strip().endswith("}")]
            if steps and max(steps) >= step:
                return
        time.sleep(0.02)
    raise AssertionError("timed out waiting for training progress")


def _run(args):
    proc = _start(args)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def _weights(final_dir):
    return load_file(str(final_dir / "model.safetensors"))


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs"


def _commands(tmp_path, model_dir):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(48))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"review {i}: the movie was\n" for i in range(32)))
    judge = tmp_path / "judge.py"
    judge.write_text("def score(prompts, completions):\n    return [len(c) / 10 for c in completions]\n")
    common = ["--model", model_dir, "--precision", "fp32", "--save-steps", "1", "--learning-rate", "1e-3"]
    return {
        "dpo": (["dpo", "--data", pairs, "--batch-size", "2", "--max-steps", "10", *common], "final"),
        "reward": (["reward", "--data", pairs, "--batch-size", "2", "--max-steps", "10", *common], "final"),
        "ppo": (
            [
                "ppo",
                "--prompts",
                prompts,
                "--reward",
                f"{judge}:score",
                "--rollout-batch-size",
                "4",
                "--max-new-tokens",
                "4",
                "--max-steps",
                "6",
                "--ppo-epochs",
                "1",
                *common,
            ],
            "final",
        ),
    }


@pytest.mark.parametrize("command", ["dpo", "reward", "ppo"])
def test_sigkill_at_a_random_step_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir, command):
    args, final = _commands(tmp_path, tiny_model_dir)[command]
    total = int(args[args.index("--max-steps") + 1])
    _run([*args, "--output", tmp_path / "full"])
    killed = tmp_path / "killed"
    k = random.Random(command).randint(1, total - 2)
    proc = _start([*args, "--output", killed])
    _wait_for_step(proc, killed, k + 1)  # step k's checkpoint exists once step k + 1 is logged
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / final).exists()
    _run([*args, "--output", killed, "--resume", "latest"])
    _assert_same_weights(tmp_path / "full" / final, killed / final)
    if command == "ppo":
        _assert_same_weights(tmp_path / "full" / "value", killed / "value")

    def strip(rows):
        return [{k: v for k, v in r.items() if not k.startswith(("wall", "time/", "tokens_per"))} for r in rows]

    assert strip(read_metrics(tmp_path / "full")) == strip(read_metrics(killed))


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_writes_a_checkpoint_and_says_how_to_resume(tmp_path, tiny_model_dir, sig, code):
    args, _ = _commands(tmp_path, tiny_model_dir)["dpo"]
    args = [a if a != "1" or args[i - 1] != "--save-steps" else "1000" for i, a in enumerate(args)]  # no periodic saves
    args[args.index("--max-steps") + 1] = "400"
    out = tmp_path / "run"
    proc = _start([*args, "--output", out])
    _wait_for_step(proc, out, 2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "--resume latest" in err and "Traceback" not in err
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "state.json").is_file()
    assert not (out / "final").exists()


def _dpo(tmp_path, model_dir, pairs, **kw):
    return DPOConfig(**trainer_kwargs(tmp_path, model_dir, pairs, **kw))


def test_corrupt_latest_checkpoint_is_skipped_for_the_previous_one(tmp_path, tiny_model_dir, pairs, caplog):
    DPOTrainer(_dpo(tmp_path, tiny_model_dir, pairs, max_steps=4, save_steps=1, save_total_limit=3)).train()
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-0000002", "step-0000003", "step-0000004"]
    model_pt = ckpts[-1] / "model.pt"
    model_pt.write_bytes(model_pt.read_bytes()[:100])  # an interrupted write
    (ckpts[-2] / "state.json").write_text("{not json")  # a bad state file: incomplete
    resumed = DPOTrainer(
        _dpo(tmp_path, tiny_model_dir, pairs, max_steps=4, save_steps=1, save_total_limit=3, resume="latest")
    )
    resumed.train()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["resumed_from_step"] == 2
    assert "skipping" in caplog.text


NaNAt = nan_at_trainer()


def test_a_nan_step_is_skipped_and_counted(tmp_path, tiny_model_dir, pairs):
    trainer = NaNAt(_dpo(tmp_path, tiny_model_dir, pairs, max_steps=5), bad_steps=[2])
    final = trainer.train()
    rows = read_metrics(tmp_path / "run")
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1, 1]
    assert "loss" not in rows[1]  # nothing from the skipped step is averaged into the log
    assert torch.isfinite(torch.tensor(final["loss"]))
    for p in trainer.model.parameters():
        assert torch.isfinite(p).all()


def test_resume_with_another_global_batch_is_refused(tmp_path, tiny_model_dir, pairs):
    """Data order and the LR schedule are functions of the global batch: another one cannot continue the run."""
    DPOTrainer(_dpo(tmp_path, tiny_model_dir, pairs, max_steps=2, save_steps=1, batch_size=2)).train()
    with pytest.raises(UserError, match=r"step-0000002: written with a global batch of 2 .*now 4; resume with the"):
        DPOTrainer(_dpo(tmp_path, tiny_model_dir, pairs, max_steps=3, batch_size=4, resume="latest")).train()


def test_skipped_steps_count_survives_a_resume(tmp_path, tiny_model_dir, pairs):
    """Step 2 is skipped; resumed from the checkpoint of step 3, the run still counts it."""
    NaNAt(_dpo(tmp_path, tiny_model_dir, pairs, max_steps=4, save_steps=1, save_total_limit=4), bad_steps=[2]).train()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000004")
    NaNAt(
        _dpo(tmp_path, tiny_model_dir, pairs, max_steps=4, save_steps=1, save_total_limit=4, resume="latest"),
        bad_steps=[2],
    ).train()
    assert [r["skipped_steps"] for r in read_metrics(tmp_path / "run") if "skipped_steps" in r] == [0, 1, 1, 1]


def test_nan_steps_in_a_row_stop_with_the_last_good_checkpoint(tmp_path, tiny_model_dir, pairs):
    trainer = NaNAt(
        _dpo(tmp_path, tiny_model_dir, pairs, max_steps=8, save_steps=1, max_nonfinite_steps=3), bad_steps=range(3, 100)
    )
    with pytest.raises(UserError, match=r"non-finite loss or gradients for 3 steps in a row.*step-0000002"):
        trainer.train()
    assert not (tmp_path / "run" / "final").exists()
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000002"
    state = torch.load(ckpt / "model.pt")
    assert all(torch.isfinite(t).all() for t in state.values())


def test_a_checkpoint_that_cannot_be_written_is_one_clear_error_and_keeps_the_previous(tmp_path, monkeypatch):
    """A full disk shows up as torch's zip writer failing mid-file: one line saying so, no half-written
    checkpoint, the earlier checkpoint untouched."""
    from prefalign.errors import UserError
    from prefalign.trainers.checkpoint import CheckpointManager

    ckpts = CheckpointManager(tmp_path, keep=2)
    first = ckpts.save(1, {"model": {"w": torch.ones(3)}}, {})

    def full_disk(obj, path):
        Path(path).write_bytes(b"PK\x03\x04partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 729135808 vs 729135700")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(
        UserError,
        match=r"step-0000002: could not write the checkpoint \(RuntimeError: .*GiB free.*"
        r"--resume latest",
    ) as err:
        ckpts.save(2, {"model": {"w": torch.zeros(3)}}, {})
    assert "\n" not in str(err.value)
    assert ckpts.complete() == [first]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [first.name]  # no temp directory left


def test_a_damaged_pickle_is_skipped_for_the_previous_checkpoint(tmp_path, tiny_model_dir, pairs, caplog):
    """A damaged data.pkl inside a checkpoint file (a flipped byte) is unreadable, not unsafe: skipped like a
    truncated file (it stopped the resume with a raw UnpicklingError)."""
    import zipfile

    DPOTrainer(_dpo(tmp_path, tiny_model_dir, pairs, max_steps=3, save_steps=1, save_total_limit=2)).train()
    rng_pt = tmp_path / "run" / "checkpoints" / "step-0000003" / "rng.pt"
    with zipfile.ZipFile(rng_pt) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    pkl = next(name for name in entries if name.endswith("data.pkl"))
    entries[pkl] = entries[pkl][:2] + b"\xff" + entries[pkl][3:]  # an opcode no pickle has
    with zipfile.ZipFile(rng_pt, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    DPOTrainer(_dpo(tmp_path, tiny_model_dir, pairs, max_steps=3, save_steps=1, resume="latest")).train()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["resumed_from_step"] == 2
    assert "rng.pt: checkpoint unreadable (UnpicklingError" in caplog.text


def test_overwrite_removes_the_earlier_runs_checkpoints_and_outputs_only(tmp_path, tiny_model_dir, pairs):
    """--overwrite replaces a run: the earlier run's checkpoints were kept, pruned in with the new run's (the newest
    by name survived: the new run's were deleted as soon as written) and then resumed by --resume latest."""
    DPOTrainer(
        _dpo(tmp_path, tiny_model_dir, pairs, max_steps=4, save_steps=1, save_total_limit=4, eval_split=0.25)
    ).train()
    run = tmp_path / "run"
    (run / "notes.txt").write_text("mine")
    assert (run / "final").is_dir() and (run / "tensorboard").is_dir() and (run / "eval_pairs.jsonl").is_file()
    cfg = _dpo(tmp_path, tiny_model_dir, pairs, max_steps=2, save_steps=1, save_total_limit=2, overwrite=True)
    DPOTrainer(cfg).train()
    assert not (run / "eval_pairs.jsonl").exists()  # the new run holds out nothing: no stale outcomes beside it
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-0000001", "step-0000002"]
    assert all(json.loads((c / "state.json").read_text())["total_steps"] == 2 for c in ckpts)
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    assert len(list((run / "tensorboard").rglob("events.*"))) == 1
    assert (run / "notes.txt").read_text() == "mine"  # not a file a run writes: left alone


def test_resume_with_changed_training_settings_is_refused(tmp_path, tiny_model_dir, pairs):
    """The optimizer and schedule come back from the checkpoint: a new learning rate was ignored while config.yaml
    said otherwise. How long to train, and what to log or save, may change."""
    DPOTrainer(_dpo(tmp_path, tiny_model_dir, pairs, max_steps=2, save_steps=1)).train()
    changed = _dpo(tmp_path, tiny_model_dir, pairs, max_steps=3, resume="latest", learning_rate=5e-2, beta=0.2)
    with pytest.raises(UserError, match=r"step-0000002: written with --beta None, now 0\.2 \(also --learning-rate\)"):
        DPOTrainer(changed).train()
    extended = _dpo(tmp_path, tiny_model_dir, pairs, max_steps=3, resume="latest", logging_steps=2, save_steps=3)
    DPOTrainer(extended).train()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["resumed_from_step"] == 2


def test_a_checkpoint_between_log_rows_keeps_their_mean(tmp_path, tiny_model_dir, pairs):
    """Checkpoint at step 3, rows every 4 steps: the resumed run's row 4 is the mean over steps 1-4, as in the run
    that was never stopped (it was the mean of step 4 alone)."""
    kw = dict(max_steps=4, save_steps=3, save_total_limit=2, logging_steps=4)
    DPOTrainer(_dpo(tmp_path, tiny_model_dir, pairs, **kw)).train()
    whole = read_metrics(tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000004")
    DPOTrainer(_dpo(tmp_path, tiny_model_dir, pairs, **kw, resume="latest")).train()
    resumed = read_metrics(tmp_path / "run")
    assert [r["step"] for r in resumed] == [r["step"] for r in whole] == [4]
    for key in ("loss", "rewards/accuracies", "grad_norm"):
        assert resumed[0][key] == pytest.approx(whole[0][key], rel=1e-6, abs=1e-9), key


def test_a_torn_last_metrics_line_does_not_stop_a_resume(tmp_path, tiny_model_dir, pairs, caplog):
    """A kill or a full disk mid-append leaves half a JSON line: the resume drops it (it raised JSONDecodeError)."""
    kw = dict(max_steps=3, save_steps=1, save_total_limit=3)
    DPOTrainer(_dpo(tmp_path, tiny_model_dir, pairs, **kw)).train()
    run = tmp_path / "run"
    shutil.rmtree(run / "checkpoints" / "step-0000003")
    metrics = run / "metrics.jsonl"
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:2]) + '{"step": 3, "lo')
    DPOTrainer(_dpo(tmp_path, tiny_model_dir, pairs, **kw, resume="latest")).train()
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert "metrics.jsonl: dropped 1 line(s) that do not parse" in caplog.text


def test_a_resume_keeps_rows_whose_text_holds_a_unicode_line_break(tmp_path, caplog):
    """samples.jsonl holds completions' text, written raw (ensure_ascii off): U+2028, U+2029 and U+0085 are no line
    ends there (str.splitlines cut such a row in two, and the resume dropped both halves as torn)."""
    from prefalign.runio import keep_rows_through, write_jsonl

    path = tmp_path / "samples.jsonl"
    rows = [{"step": s, "completion": f"a\u2028b\u2029c\x85d {s}"} for s in (1, 2, 3)]
    write_jsonl(path, rows)
    assert keep_rows_through(path, 2) == (rows[:2], rows[2:])
    assert "do not parse" not in caplog.text
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line] == rows[:2]


def test_a_streak_of_nan_steps_counts_across_a_resume(tmp_path, tiny_model_dir, pairs):
    """Steps 3 and 4 non-finite, SIGTERM during step 4 (its stop checkpoint is the one written inside a streak),
    resumed: the third in a row (step 5) stops the run (the streak restarted at 0 after a resume)."""
    from prefalign.trainers.guard import StopRequested

    class TermAt4(NaNAt):
        def compute_loss(self, batch):
            if self.current == 4 and self.model.training:
                os.kill(os.getpid(), signal.SIGTERM)  # GracefulStop: finish the step, checkpoint, stop
            return super().compute_loss(batch)

    kw = dict(max_steps=6, save_steps=1, save_total_limit=2, max_nonfinite_steps=3)
    with pytest.raises(StopRequested, match="stopped after step 4 of 6"):
        TermAt4(_dpo(tmp_path, tiny_model_dir, pairs, **kw), bad_steps=[3, 4]).train()
    resumed = NaNAt(_dpo(tmp_path, tiny_model_dir, pairs, resume="latest", **kw), bad_steps=[3, 4, 5])
    with pytest.raises(UserError, match=r"non-finite loss or gradients for 3 steps in a row \(last at step 5\)"):
        resumed.train()


def test_a_run_resumed_at_its_end_logs_its_final_evaluation_once(tmp_path, tiny_model_dir, pairs):
    """Killed while saving final/ (after its last checkpoint and final evaluation), resumed: one final eval row."""
    kw = dict(max_steps=2, save_steps=1, eval_split=0.2)
    DPOTrainer(_dpo(tmp_path, tiny_model_dir, pairs, **kw)).train()
    whole = read_metrics(tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "final")
    DPOTrainer(_dpo(tmp_path, tiny_model_dir, pairs, **kw, resume="latest")).train()
    assert read_metrics(tmp_path / "run") == whole
    assert sum("eval/loss" in r and r["step"] == 2 for r in whole) == 1
    assert (tmp_path / "run" / "final").is_dir()


def test_a_signal_on_a_save_step_writes_its_checkpoint_once(tmp_path, tiny_model_dir, pairs, monkeypatch):
    """SIGTERM during step 2 of a run saving every step: the stop uses step 2's checkpoint (a second write replaced
    it by removing it first: with --save-total-limit 1 a kill between the two left no checkpoint)."""
    from prefalign.trainers.checkpoint import CheckpointManager
    from prefalign.trainers.guard import StopRequested

    saved, save = [], CheckpointManager.save
    monkeypatch.setattr(
        CheckpointManager, "save", lambda self, step, *a, **k: saved.append(step) or save(self, step, *a, **k)
    )

    class TermAt2(DPOTrainer):
        def batch_for(self, step, micro):
            if step == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().batch_for(step, micro)

    with pytest.raises(StopRequested, match=r"stopped after step 2 of 4; checkpoint .*step-0000002"):
        TermAt2(_dpo(tmp_path, tiny_model_dir, pairs, max_steps=4, save_steps=1, save_total_limit=1)).train()
    assert saved == [1, 2]
