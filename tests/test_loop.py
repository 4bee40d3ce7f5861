"""The run skeleton and the dataset step (prefalign/trainers/run.py, loop.py): schedule, accumulation, clipping,
resume, run length, evaluation data and outputs, driven through the dpo and sft trainers on a tiny model for a few
steps."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import learnable_pairs, read_metrics, trainer_kwargs, write_jsonl
from transformers import AutoModelForCausalLM

from prefalign.trainers.dpo import DPOConfig, DPOTrainer
from prefalign.trainers.optim import lr_lambda
from prefalign.trainers.reward import RewardConfig, RewardTrainer
from prefalign.trainers.sft import SFTConfig, SFTTrainer

METRICS_DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


def _params(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()}


def _dpo(tmp_path, model_dir, data, name, **kw):
    trainer = DPOTrainer(DPOConfig(**trainer_kwargs(tmp_path, model_dir, data, output=str(tmp_path / name), **kw)))
    final = trainer.train()
    return trainer, read_metrics(tmp_path / name), final


# ---------------------------------------------------------------- the learning-rate schedule
def test_lr_lambda_warms_up_then_follows_the_schedule():
    # warmup 2 of 10 steps: (step + 1) / (warmup + 1), never 0 so the first step moves the weights; then
    # the schedule over the 8 remaining steps, reaching 0 at step 10 and staying there
    warm = [1 / 3, 2 / 3]
    want = {
        "constant": warm + [1.0] * 11,
        "linear": warm + [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0, 0.0, 0.0],
        "cosine": warm
        + [
            1.0,
            0.9619397662556434,
            0.8535533905932737,
            0.6913417161825449,
            0.5,
            0.30865828381745514,
            0.14644660940672627,
            0.03806023374435663,
            0.0,
            0.0,
            0.0,
        ],
    }
    for kind, values in want.items():
        f = lr_lambda(kind, 2, 10)
        assert [f(step) for step in range(13)] == pytest.approx(values, abs=1e-12), kind
    # no warmup: the peak at step 0
    assert lr_lambda("linear", 0, 4)(0) == lr_lambda("cosine", 0, 4)(0) == lr_lambda("constant", 0, 4)(0) == 1.0
    assert lr_lambda("linear", 0, 4)(3) == 0.25


# ---------------------------------------------------------------- gradient accumulation
def test_grad_accum_gives_the_update_of_the_whole_batch(tmp_path, tiny_model_dir, pairs):
    """2 pairs x 2 micro-batches == 4 pairs x 1: the same examples per step (the data order is a function of the
    step), the same mean loss, gradient norm and weights."""
    runs = {}
    for bs, accum in ((4, 1), (2, 2)):
        trainer, rows, _ = _dpo(tmp_path, tiny_model_dir, pairs, f"b{bs}", batch_size=bs, grad_accum=accum, max_steps=2)
        runs[bs] = rows, _params(trainer)
    (rows4, p4), (rows2, p2) = runs[4], runs[2]
    for a, b in zip(rows4, rows2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], abs=1e-6)
        # a sum instead of a mean over micro-batches would double it (and Adam would hide that in the weights)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    for name, p in p4.items():
        # Adam moves each weight by ~lr * sign(g) = 1e-3 per step: float-order noise on near-zero gradients shows up
        # as ~1e-6..5e-6 after 2 steps, a wrong micro-batch or weighting as ~lr; tolerance 2% of one step's move
        torch.testing.assert_close(p2[name], p, atol=2e-5, rtol=0, msg=name)


def test_sft_grad_accum_keeps_the_token_level_mean(tmp_path, tiny_model_dir):
    """Completions of 1 to 8 words: the token-level mean over 4 examples is not the mean of two 2-example means."""
    data = write_jsonl(
        tmp_path / "sft.jsonl", [{"prompt": f"Q{i}:", "completion": " yes" * (1 + i % 8)} for i in range(16)]
    )
    runs = {}
    for bs, accum in ((4, 1), (2, 2)):
        trainer = SFTTrainer(
            SFTConfig(
                **trainer_kwargs(
                    tmp_path,
                    tiny_model_dir,
                    data,
                    output=str(tmp_path / f"b{bs}"),
                    batch_size=bs,
                    grad_accum=accum,
                    max_steps=2,
                )
            )
        )
        trainer.train()
        runs[bs] = read_metrics(tmp_path / f"b{bs}"), _params(trainer)
    (rows4, p4), (rows2, p2) = runs[4], runs[2]
    for a, b in zip(rows4, rows2, strict=True):
        # one float32 token mean vs two merged in float64: the loss (~10.5) agrees to its float32 spacing (9.5e-7);
        # the bug this guards against moved it by ~5e-3
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    for name, p in p4.items():
        torch.testing.assert_close(p2[name], p, atol=2e-5, rtol=0, msg=name)  # as in the DPO test above


# ---------------------------------------------------------------- gradient clipping
def test_clipping_bounds_the_update_and_the_logged_norm_is_before_clipping(tmp_path, tiny_model_dir, pairs):
    """Adam's first step moves a weight by lr * g / (|g| + eps) <= lr * |g| / eps, so a gradient clipped to norm c
    moves the weights by at most lr * c / eps in L2 norm (weight decay 0); unclipped it moves them by ~lr per
    weight."""
    lr, c, adam_eps = 1e-3, 1e-10, 1e-8  # AdamW's default eps
    before = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    moved, norms = {}, {}
    for clip in (None, c):
        trainer, rows, _ = _dpo(
            tmp_path, tiny_model_dir, pairs, f"clip{clip}", max_grad_norm=clip, max_steps=1, learning_rate=lr
        )
        after = _params(trainer)
        moved[clip] = math.sqrt(sum(float((after[n] - p.detach()).pow(2).sum()) for n, p in before.items()))
        norms[clip] = rows[0]["grad_norm"]
    bound = lr * c / adam_eps
    assert moved[c] <= bound * (1 + 1e-3)
    assert moved[None] > 1000 * bound
    assert norms[c] == pytest.approx(norms[None], rel=1e-6) and norms[c] > 1e6 * c  # the norm before clipping


# ---------------------------------------------------------------- resume
def test_resume_from_a_given_checkpoint_with_lora_dropout_equals_the_uninterrupted_run(tmp_path, tiny_model_dir, pairs):
    """LoRA dropout draws from the global RNG, so a resumed run matches only if the RNG states come back. The run
    resumes from its step-2 checkpoint by path while the newer step-4 one is still there."""
    kw = dict(lora_r=4, lora_alpha=8, lora_dropout=0.5, learning_rate=1e-2, max_steps=4, save_steps=2)
    full, rows, _ = _dpo(tmp_path, tiny_model_dir, pairs, "run", **kw)
    want = _params(full)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000002", "step-0000004"]
    resumed, rows_again, _ = _dpo(tmp_path, tiny_model_dir, pairs, "run", resume=str(ckpts / "step-0000002"), **kw)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["resumed_from_step"] == 2
    got = _params(resumed)
    for name, p in want.items():
        assert torch.equal(got[name], p), f"{name} differs after resume"
    assert [r["loss"] for r in rows_again] == [r["loss"] for r in rows]


def test_resuming_an_older_checkpoint_removes_the_later_ones(tmp_path, tiny_model_dir, pairs, caplog):
    """Left in place, the abandoned run's step-4 would be what a later --resume latest continues."""
    _dpo(tmp_path, tiny_model_dir, pairs, "run", max_steps=4, save_steps=2)
    ckpts = tmp_path / "run" / "checkpoints"
    _dpo(tmp_path, tiny_model_dir, pairs, "run", max_steps=3, save_steps=2, resume=str(ckpts / "step-0000002"))
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000002", "step-0000003"]
    assert "resumed from step 2: removed the later checkpoints step-0000004" in caplog.text


# ---------------------------------------------------------------- run length, evaluation file, outputs
EVAL_ROWS = [{"prompt": f"Film {i} was", "chosen": " great" * (1 + i), "rejected": " dull."} for i in range(5)]


@pytest.fixture(scope="module")
def epochs_run(tmp_path_factory, tiny_model_dir):
    """--epochs 0.3 of 48 pairs at 4 per step (12 steps per epoch: ceil(3.6) = 4 steps), linear schedule with one
    warmup step, evaluated on a separate 5-row file (batches of 4 and 1)."""
    tmp = tmp_path_factory.mktemp("epochs")
    data = write_jsonl(tmp / "pairs.jsonl", learnable_pairs(48))
    evals = write_jsonl(tmp / "eval.jsonl", EVAL_ROWS)
    trainer, rows, _ = _dpo(
        tmp,
        tiny_model_dir,
        data,
        "run",
        max_steps=None,
        epochs=0.3,
        eval_data=str(evals),
        eval_split=0.5,
        lr_scheduler="linear",
        warmup_steps=1,
        learning_rate=1e-3,
    )
    return tmp / "run", rows, trainer


def test_fractional_epochs_round_up_to_whole_steps(epochs_run):
    out, rows, _ = epochs_run
    run = json.loads((out / "run.json").read_text())
    assert run["steps_per_epoch"] == 12 and run["total_steps"] == 4
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["epoch"] for r in train] == pytest.approx([1 / 12, 2 / 12, 3 / 12, 4 / 12])
    # the learning rate each step used: lr_lambda("linear", warmup 1, total 4) at steps 0..3
    assert [r["lr"] for r in train] == pytest.approx([1e-3 * f for f in (0.5, 1.0, 2 / 3, 1 / 3)], rel=1e-9)


def test_eval_data_file_is_the_whole_held_out_set(epochs_run, tiny_model_dir):
    """--eval-data overrides --eval-split: training keeps all 48 pairs, evaluation is exactly the file's 5 rows, a
    plain mean over them (not a mean of the batch means 4 + 1)."""
    from prefalign.data import PreferenceCollator, load_preferences, tokenize_preferences
    from prefalign.models.logprobs import completion_logprobs, sequence_logprobs

    out, rows, trainer = epochs_run
    run = json.loads((out / "run.json").read_text())
    assert (run["train_examples"], run["eval_examples"]) == (48, 5)
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 4]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # the policy at step 0
    examples, _ = load_preferences(str(out.parent / "eval.jsonl"), trainer.tokenizer)
    tokenized, _ = tokenize_preferences(examples, trainer.tokenizer, 512, 256)
    collate = PreferenceCollator(trainer.tokenizer.pad_token_id)
    chosen = []
    with torch.no_grad():
        for pair in tokenized:  # one pair at a time: no padding
            b = collate([pair])
            logps = completion_logprobs(model, b["input_ids"], b["attention_mask"], b["completion_mask"])
            chosen.append(float(sequence_logprobs(logps, b["completion_mask"])[0]))
    assert len(set(chosen)) == 5  # rows of different lengths: a wrong weighting would show
    assert evals[0]["eval/logps/chosen"] == pytest.approx(sum(chosen) / 5, abs=1e-4)
    assert evals[0]["eval/rewards/accuracies"] == 0.0  # policy == reference: every pair a tie


def test_tensorboard_events_hold_the_logged_scalars(epochs_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, rows, _ = epochs_run
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows if "loss" in r], rel=1e-6)
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 4]


# ---------------------------------------------------------------- every logged key is documented
def _documented(trainer_heading: str) -> tuple[set[str], set[str]]:
    """``(keys, eval keys)`` named in docs/metrics.md for a trainer: the sections every row and every loop row
    share, plus the trainer's own."""
    sections = {s.split("\n", 1)[0].strip(): s for s in METRICS_DOC.read_text(encoding="utf-8").split("\n## ")}
    shared = [v for k, v in sections.items() if k in ("Every row", "Every training row") or "(the shared loop)" in k]
    own = sections[trainer_heading]
    keys = {k for text in [*shared, own] for k in re.findall(r"`([\w/]+)`", text)}
    evals = {k for text in [*shared, own] for k in re.findall(r"`(eval/[\w/]+)`", text)}
    if "`eval/<key>`" in own:  # "eval/<key>: loss and any of the above"
        evals |= {f"eval/{k}" for k in keys}
    return keys, evals


def run_json_documented(command: str) -> tuple[set[str], set[str]]:
    """``(keys, conditional)``: the run.json keys docs/metrics.md's table gives ``command`` (``all`` or its name),
    and of those the ones written only sometimes (on CUDA)."""
    table = METRICS_DOC.read_text(encoding="utf-8").split("## `run.json`", 1)[1]
    keys, conditional = set(), set()
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        if "all" in cells[1] or command in re.findall(r"\w+", cells[1]):
            named = set(re.findall(r"`(\w+)`", cells[0]))
            keys |= named
            if "CUDA" in cells[1]:
                conditional |= named
    return keys, conditional


def assert_run_json_documented(out, command: str, extra: set[str] = frozenset()) -> None:
    """``out``/run.json holds exactly the keys docs/metrics.md gives ``command`` (less the CUDA-only ones), plus
    ``extra`` (keys the table names as "`beta`, ...": a loss's hyperparameters)."""
    import json

    keys, conditional = run_json_documented(command)
    written = set(json.loads((Path(out) / "run.json").read_text()))
    assert written - extra == keys - conditional - extra


@pytest.mark.parametrize(
    "name,trainer,config",
    [("sft", SFTTrainer, SFTConfig), ("dpo", DPOTrainer, DPOConfig), ("reward", RewardTrainer, RewardConfig)],
)
def test_every_logged_key_is_documented(tmp_path, tiny_model_dir, pairs, name, trainer, config):
    cfg = config(**trainer_kwargs(tmp_path, tiny_model_dir, pairs, max_steps=1, eval_split=0.25))
    trainer(cfg).train()
    rows = read_metrics(tmp_path / "run")
    keys, evals = _documented(f"`prefalign {name}`")
    logged = {k for r in rows for k in r}
    assert {k for k in logged if k.startswith("eval/")} and {k for k in logged if not k.startswith("eval/")}
    assert not {k for k in logged if k.startswith("eval/")} - evals
    assert not {k for k in logged if not k.startswith("eval/")} - keys
    assert_run_json_documented(tmp_path / "run", name, extra=set(cfg.loss_hyperparams) if name == "dpo" else set())


def test_tokens_per_second_sums_every_process_s_tokens(monkeypatch):
    # two processes that ran 100 and 300 tokens in 2 s: the row says 200 tokens/s (the sum), not this process's
    # count times the process count (100 x 2 / 2 = 100 on the main process)
    from types import SimpleNamespace

    from prefalign.trainers import loop
    from prefalign.trainers.loop import RunSizes, Trainer

    class TwoProcesses:
        num_processes, device = 2, torch.device("cpu")

        def reduce(self, x, reduction):
            assert reduction == "sum"
            return x + 300.0  # the other process's tokens

    trainer = Trainer.__new__(Trainer)
    trainer.accelerator, trainer.world, trainer.tokens, trainer.t_last, trainer.lr = TwoProcesses(), 2, 100, 10.0, 0.0
    trainer.sizes = RunSizes(n_train=8, micro_batch=2, grad_accum=1, world=2, total_steps=2)
    trainer.pooled_mean = lambda running: {}
    trainer.running = None
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: 12.0))
    assert trainer.log_row(1)["tokens_per_second"] == 200.0
