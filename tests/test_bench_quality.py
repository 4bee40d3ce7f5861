"""bench.quality (make bench-quality): the length rules it counts, the reward readout, DPO's implicit
reward margin, its statistics, and a prefalign-only run end to end on a tiny model."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import quality
from prefalign.data.preferences import PreferenceExample

ROOT = Path(__file__).resolve().parents[1]


def words(n: int) -> str:
    """Text of exactly ``n`` tokens under the default tokenizer (" a" is one token)."""
    return " a" * n


@pytest.fixture(scope="module")
def lengths_ok(tokenizer):
    ids = tokenizer(words(7), add_special_tokens=False)["input_ids"]
    assert len(ids) == 7, "the tests below count ' a' as one token"


def test_length_rules_counted_per_library(tokenizer, lengths_ok):
    # max_length 20: prefalign's prompt limit is 10; TRL counts prompt + completion + EOS as one sequence
    examples = [
        PreferenceExample(words(5), words(5), words(3)),  # 5 + 6 <= 20: whole everywhere
        PreferenceExample(words(12), words(3), words(2)),  # prefalign cuts the prompt to 10; TRL: 16 fits
        PreferenceExample(words(8), words(15), words(2)),  # 8 + 16 > 20: TRL drops / cuts; prefalign drops (4 < 8)
        PreferenceExample(words(4), words(19), words(2)),  # completion 20 > 20 - 1: prefalign drops
        PreferenceExample(words(21), words(2), words(1)),  # the prompt alone fills 20: TRL's DPOTrainer drops
    ]
    # (chosen and rejected differ in every pair: a pair whose completions tokenise alike is dropped before truncation)
    flags = quality.kept_whole(examples, tokenizer, 20)
    assert flags == {
        "prefalign": [True, False, False, False, False],
        "trl": [True, True, False, False, False],
        "both": [True, False, False, False, False],
    }
    assert quality.train_usage(examples, tokenizer, 20) == {
        "prefalign": {"whole": 1, "prompt_cut": 2, "dropped": 2},
        "trl_reward": {"whole": 2, "dropped": 3},
        "trl_dpo": {"whole": 2, "end_cut": 2, "dropped": 1},
    }


def test_length_flags_stay_aligned_when_tokenisation_drops_a_pair(tokenizer, lengths_ok):
    # the first pair's completions tokenise alike (" a" + EOS both ways): prefalign never trains on it
    examples = [PreferenceExample(words(3), " a", " a<|im_end|>"), PreferenceExample(words(3), words(2), words(1))]
    assert quality.kept_whole(examples, tokenizer, 20)["prefalign"] == [False, True]


def test_reward_margins_read_where_both_libraries_train(tiny_reward_model_dir, tokenizer):
    """The scorer reads the head at the completion's last token before its EOS: what Hugging Face's own forward gives
    for prompt + completion + EOS with pad == EOS (TRL's RewardTrainer) and what prefalign's RewardTrainer trains
    (its collated batch, the final EOS masked); the head at the EOS itself is a different number."""
    from transformers import AutoModelForSequenceClassification

    from prefalign.data import PreferenceCollator
    from prefalign.data.tokens import tokenize_preferences
    from prefalign.models.value import last_token_rewards
    from prefalign.trainers.reward import without_final_token

    held = [PreferenceExample(" Hi there,", " a kind answer.", " no."), PreferenceExample(" Q:", " yes", " maybe so")]
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model_dir).eval()
    assert tokenizer.pad_token_id == tokenizer.eos_token_id

    def hf(text):  # one unpadded row: Hugging Face's pooling, as TRL trains it
        ids = tokenizer(text + tokenizer.eos_token, return_tensors="pt", add_special_tokens=False)
        return float(model(**ids).logits[0, 0])

    def at_eos(text):
        ids = tokenizer(text + tokenizer.eos_token, return_tensors="pt", add_special_tokens=False)["input_ids"]
        return float(model.score(model.model(input_ids=ids).last_hidden_state)[0, -1, 0])

    batch = PreferenceCollator(tokenizer.pad_token_id)(tokenize_preferences(held, tokenizer, None)[0])
    with torch.no_grad():
        want_trl = [hf(e.prompt + e.chosen) - hf(e.prompt + e.rejected) for e in held]
        r = last_token_rewards(model, batch["input_ids"], without_final_token(batch["attention_mask"]))
        want_ours = (r[:2] - r[2:]).numpy()
        at_eos_margins = [at_eos(e.prompt + e.chosen) - at_eos(e.prompt + e.rejected) for e in held]
    got = quality.reward_margins(str(tiny_reward_model_dir), held)
    np.testing.assert_allclose(got, want_trl, atol=1e-5)
    np.testing.assert_allclose(got, want_ours, atol=1e-5)
    assert np.abs(got - np.array(at_eos_margins)).max() > 1e-3  # a readout at the EOS would differ


def _adapter(base_dir, out, init_b: float):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, init_b) if init_b else p.data.zero_()
    peft.save_pretrained(out)
    return str(out)


def test_dpo_margins_match_a_naive_loop_and_vanish_for_a_zero_adapter(tiny_model_dir, tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    held = [
        PreferenceExample(" The film", " was good.", " was bad and long."),
        PreferenceExample(" A long prompt with words", " yes", " no"),
        PreferenceExample(" Q", " one two three four", " five"),
    ]
    finals = {
        "prefalign": _adapter(tiny_model_dir, tmp_path / "a", 0.5),
        "trl": _adapter(tiny_model_dir, tmp_path / "b", 0.0),
    }
    got = quality.dpo_margins(str(tiny_model_dir), finals, held, tokenizer)

    def logp(model, prompt, completion):  # one row, no padding: sum of log p(completion + EOS | prompt)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([p + c])
        logits = model(ids).logits[0, :-1].log_softmax(-1)
        return float(sum(logits[len(p) - 1 + i, t] for i, t in enumerate(c)))

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), finals["prefalign"]).eval()
    with torch.no_grad():
        want = [
            (logp(policy, e.prompt, e.chosen) - logp(base, e.prompt, e.chosen))
            - (logp(policy, e.prompt, e.rejected) - logp(base, e.prompt, e.rejected))
            for e in held
        ]
    np.testing.assert_allclose(got["prefalign"], want, atol=1e-4)
    assert min(abs(x) for x in want) > 1e-3  # the adapter moved every margin, so the comparison has teeth
    np.testing.assert_array_equal(got["trl"], np.zeros(3))  # policy == reference: every margin exactly 0


def test_correct_counts_ties_as_half():
    np.testing.assert_array_equal(quality.correct([0.3, -1.0, 0.0, 2.0]), [1.0, 0.0, 0.5, 1.0])


def test_intervals():
    assert quality.interval(np.ones(10)) == (1.0, 1.0, 1.0)
    assert quality.interval([1.0]) == (1.0, 1.0, 1.0)
    x = np.r_[np.ones(150), np.zeros(150)]
    value, low, high = quality.interval(x)
    # 300 Bernoulli(1/2): standard error sqrt(0.25 / 300) = 0.0289, so the 95% interval is about +-0.057
    assert (
        value == 0.5
        and math.isclose(low, 0.5 - 0.0566, abs_tol=0.01)
        and math.isclose(high, 0.5 + 0.0566, abs_tol=0.01)
    )
    # paired: two sides right on the same pairs differ by exactly 0; one side right on 30 more pairs by 0.1
    assert quality.interval(x, x) == (0.0, 0.0, 0.0)
    y = x.copy()
    y[150:180] = 1.0
    d, dl, dh = quality.interval(y, x)
    assert math.isclose(d, 0.1) and 0.06 < dl < 0.1 < dh < 0.14


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--kinds", "ppo"], "--kinds: ppo is not one of reward, dpo_lora"),
        (["--sides", ""], "--sides: empty is not one of prefalign, trl"),
        (["--pairs", "4"], "--pairs must be >= 8"),
    ],
)
def test_bad_flags_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        quality.parse(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_prefalign_side_end_to_end(tiny_model_dir, tmp_path):
    """Both models trained by prefalign's CLI on 16 HH pairs (15 kept: one step), 4 held-out pairs scored."""
    out = tmp_path / "q"
    cmd = [sys.executable, "-m", "bench.quality", "--sides", "prefalign", "--pairs", "16", "--heldout", "4"]
    cmd += ["--max-length", "128", "--model", str(tiny_model_dir), "--out", str(out), "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert [(r["kind"], r["side"]) for r in res["runs"]] == [("reward", "prefalign"), ("dpo_lora", "prefalign")]
    assert [(a["kind"], a["subset"]) for a in res["accuracy"]] == [
        ("reward", "all"),
        ("reward", "both keep whole"),
        ("dpo_lora", "all"),
        ("dpo_lora", "both keep whole"),
    ]
    assert all(a["n"] == 4 for a in res["accuracy"] if a["subset"] == "all")
    for a in res["accuracy"]:
        if a["n"] == 0:  # no held-out pair fits max_length on both sides: reported as absent, not as 0
            assert a["prefalign"] is None and a["subset"] == "both keep whole"
            continue
        value, low, high = a["prefalign"]
        assert low <= value <= high and value in {k / (2 * a["n"]) for k in range(2 * a["n"] + 1)}
    usage = res["usage"]["prefalign"]
    assert usage["whole"] + usage["prompt_cut"] + usage["dropped"] == 16
    assert res["runs"][0]["train_rows"] == 16 - usage["dropped"]
    assert len((out / "data" / "heldout.jsonl").read_text().splitlines()) == 4
    assert "| reward | all | 4 |" in (out / "results.md").read_text()
