import math
import sys

import pytest
import torch
from conftest import tiny_reward_model

from prefalign.errors import UserError
from prefalign.models.value import last_token_rewards
from prefalign.rewards import (
    JUDGES,
    CallableReward,
    RewardModel,
    RewardSource,
    VaderJudge,
    check_scores,
    load_reward_source,
)

# ------------------------------------------------------------------------------------------------ vader

POSITIVE = "This movie is wonderful, I loved every minute of it. Brilliant!"
NEGATIVE = "A horrible, boring and awful film. I hated it."
NEUTRAL = "The film is ninety minutes long and was released on a Tuesday."


def test_vader_scores_are_vader_compound():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    texts = [POSITIVE, NEGATIVE, NEUTRAL]
    scores = VaderJudge().score(["", "", ""], texts)
    expected = torch.tensor([analyzer.polarity_scores(t)["compound"] for t in texts])
    assert scores.dtype == torch.float32 and scores.shape == (3,) and scores.device.type == "cpu"
    torch.testing.assert_close(scores, expected)
    assert scores[0] > 0.5 and scores[1] < -0.5 and abs(scores[2]) < 0.05


def test_vader_scores_the_completion_only():
    scores = JUDGES["vader"]().score([NEGATIVE + " Terrible, disgusting, the worst."], [NEUTRAL])
    assert abs(scores.item()) < 0.05


def test_vader_missing_package_says_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vaderSentiment", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "vaderSentiment.vaderSentiment", None)
    with pytest.raises(UserError, match="pip install vaderSentiment"):
        VaderJudge()


# -------------------------------------------------------------------------------------------- callables

REWARD_MODULE = """
import math
import torch

def margin(prompts, completions):
    return [len(c) - len(p) for p, c in zip(prompts, completions)]

def as_tensor(prompts, completions):
    return torch.arange(len(completions), dtype=torch.float64)

def as_column(prompts, completions):
    return torch.zeros(len(completions), 1)

def boom(prompts, completions):
    raise ValueError("bad input\\nsecond line")

def short(prompts, completions):
    return [1.0] * (len(completions) - 1)

def words(prompts, completions):
    return ["good"] * len(completions)

def nan(prompts, completions):
    return [0.0] + [math.nan] * (len(completions) - 1)

def inf(prompts, completions):
    return [math.inf] * len(completions)

def nothing(prompts, completions):
    pass

class Scorer:
    @staticmethod
    def score(prompts, completions):
        return [1] * len(completions)

NOT_CALLABLE = 3
"""


@pytest.fixture()
def reward_module(tmp_path, monkeypatch):
    """``my_rewards`` importable by name (and at ``tmp_path/my_rewards.py``)."""
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    yield tmp_path / "my_rewards.py"
    sys.modules.pop("my_rewards", None)


PROMPTS = ["ab", "abcd", ""]
COMPLETIONS = ["abcdef", "a", "xyz"]


def test_callable_by_module_gets_prompts_and_completions(reward_module):
    source = load_reward_source("my_rewards:margin")
    assert isinstance(source, CallableReward) and source.name == "my_rewards:margin"
    scores = source.score(PROMPTS, COMPLETIONS)
    assert scores.dtype == torch.float32
    assert scores.tolist() == [4.0, -3.0, 3.0]


def test_callable_by_file_path(reward_module):
    source = load_reward_source(f"{reward_module}:margin")
    assert isinstance(source, CallableReward)
    assert source.score(PROMPTS, COMPLETIONS).tolist() == [4.0, -3.0, 3.0]


def test_callable_may_return_a_tensor_or_be_a_method(reward_module):
    assert load_reward_source("my_rewards:as_tensor").score(PROMPTS, COMPLETIONS).tolist() == [0.0, 1.0, 2.0]
    assert load_reward_source("my_rewards:Scorer.score").score(PROMPTS, COMPLETIONS).tolist() == [1.0, 1.0, 1.0]


def test_callable_module_not_found():
    with pytest.raises(UserError, match=r"'no_such_module_xyz:fn'.*module 'no_such_module_xyz' not found"):
        load_reward_source("no_such_module_xyz:fn")


def test_callable_file_not_found(tmp_path):
    with pytest.raises(UserError, match=r"file .*missing\.py not found"):
        load_reward_source(f"{tmp_path}/missing.py:fn")


def test_callable_file_without_py_suffix_is_one_line(tmp_path):
    """A path Python has no loader for (no .py): a one-line error naming it, not a NoneType traceback."""
    (tmp_path / "rewards_file").write_text("def fn(prompts, completions):\n    return [1.0] * len(prompts)\n")
    with pytest.raises(UserError, match=r"rewards_file is not a Python file; name a \.py file"):
        load_reward_source(f"{tmp_path}/rewards_file:fn")


def test_callable_module_whose_own_import_fails(tmp_path, monkeypatch):
    (tmp_path / "broken_rewards.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        UserError,
        match=r"'broken_rewards:fn'.*importing broken_rewards failed: "
        r"ModuleNotFoundError.*no_such_dependency_xyz",
    ):
        load_reward_source("broken_rewards:fn")


def test_callable_attribute_not_found(reward_module):
    with pytest.raises(UserError, match=r"'my_rewards:missing'.*has no attribute 'missing'"):
        load_reward_source("my_rewards:missing")


def test_callable_attribute_not_callable(reward_module):
    with pytest.raises(UserError, match=r"'my_rewards:NOT_CALLABLE'.*int, not callable"):
        load_reward_source("my_rewards:NOT_CALLABLE")


def test_callable_raised(reward_module):
    with pytest.raises(UserError, match=r"^reward function 'my_rewards:boom' raised ValueError: bad input$"):
        load_reward_source("my_rewards:boom").score(PROMPTS, COMPLETIONS)


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        ("short", r"returned 2 scores for 3 completions"),
        ("words", r"returned a non-number at index 0: 'good' \(str\)"),
        ("nan", r"returned a non-finite score at index 1: nan"),
        ("inf", r"returned a non-finite score at index 0: inf"),
        ("nothing", r"returned NoneType; expected a list of 3 numbers"),
        ("as_column", r"returned an array of shape \(3, 1\); expected shape \(3,\)"),
    ],
)
def test_callable_bad_return_values(reward_module, fn, message):
    with pytest.raises(UserError, match=rf"^reward function 'my_rewards:{fn}' {message}"):
        load_reward_source(f"my_rewards:{fn}").score(PROMPTS, COMPLETIONS)


@pytest.mark.parametrize("value", [1e39, -(10**400)], ids=["float", "int"])
def test_a_score_beyond_float32_is_refused(value):
    """Scores are held in float32: 1e39 passed a float64 check and became inf; 10**400 raised OverflowError."""
    with pytest.raises(UserError, match=r"^test returned a score at index 1 beyond float32's range \(3.4e38\): "):
        check_scores([0.0, value], 2, "test")


def test_a_weighted_sum_that_overflows_float32_is_refused():
    from prefalign.reward_mix import WeightedRewards

    class Huge:
        def score(self, prompts, completions):
            return [3e38] * len(completions)

    mix = WeightedRewards({"a": Huge(), "b": Huge()}, [1.0, 1.0])
    with pytest.raises(UserError, match=r"^--reward-weights: the weighted sum of the rewards overflows float32 at"):
        mix.score(PROMPTS, COMPLETIONS)


def test_check_scores_accepts_sequences_and_arrays():
    import numpy as np

    for values in ([1, 2.5], (1, 2.5), torch.tensor([1.0, 2.5]), np.array([1.0, 2.5])):
        out = check_scores(values, 2, "test")
        assert out.dtype == torch.float32 and out.tolist() == [1.0, 2.5]
    with pytest.raises(UserError, match=r"^test returned str"):
        check_scores("12", 2, "test")


# ----------------------------------------------------------------------------------------- reward model


@pytest.fixture(scope="module")
def reward_dir(tokenizer, tmp_path_factory):
    """A tiny random scalar reward model saved with the default tokenizer; returns (dir, model)."""
    model = tiny_reward_model(tokenizer)
    path = tmp_path_factory.mktemp("rm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


EOS = "<|im_end|>"


def _rm_examples(tokenizer):
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Rate this film."}], tokenize=False, add_generation_prompt=True
    )
    prompts = ["The movie was", "Tell me a story.", chat, "Hi", "A much longer prompt about a film that goes on"]
    completions = [" great.", " Once upon a time" + EOS, "It was fine." + EOS, " there", " and on." + EOS]
    return prompts, completions


@torch.no_grad()
def _naive_score(model, tokenizer, text, max_length=None):
    """One sequence alone, no padding: the score head applied to the hidden state of its last token."""
    ids = torch.tensor([tokenizer(text).input_ids[-max_length if max_length else 0 :]])
    hidden = model.model(ids).last_hidden_state  # (1, T, H)
    return model.score(hidden)[0, -1, 0]


def test_reward_model_matches_naive_unpadded_forward_with_pad_equal_eos(reward_dir, tokenizer):
    path, model = reward_dir
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the case the HF pooling gets wrong
    prompts, completions = _rm_examples(tokenizer)
    source = load_reward_source(str(path), batch_size=2)
    assert isinstance(source, RewardModel) and isinstance(source, RewardSource)
    scores = source.score(prompts, completions)
    assert scores.dtype == torch.float32 and scores.shape == (5,) and scores.device.type == "cpu"
    texts = [p + c for p, c in zip(prompts, completions)]
    expected = torch.stack([_naive_score(model, tokenizer, t) for t in texts])
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)

    with torch.no_grad():
        hf_own = torch.stack([model(torch.tensor([tokenizer(t).input_ids])).logits[0, 0] for t in texts])
    ends_with_eos = torch.tensor([t.endswith(EOS) for t in texts])
    # Without a trailing EOS, HF's own pooling is the same; with it, HF scores the token before the EOS.
    torch.testing.assert_close(scores[~ends_with_eos], hf_own[~ends_with_eos], atol=1e-5, rtol=1e-5)
    assert ((scores - hf_own).abs()[ends_with_eos] > 1e-4).all()


def test_reward_model_is_batch_order_and_batch_size_invariant(reward_dir, tokenizer):
    path, _ = reward_dir
    prompts, completions = _rm_examples(tokenizer)
    scores = RewardModel(str(path), batch_size=2).score(prompts, completions)
    perm = [3, 0, 4, 2, 1]
    permuted = RewardModel(str(path), batch_size=3).score([prompts[i] for i in perm], [completions[i] for i in perm])
    torch.testing.assert_close(permuted, scores[perm], atol=1e-5, rtol=1e-5)
    one_by_one = RewardModel(str(path), batch_size=1).score(prompts, completions)
    torch.testing.assert_close(one_by_one, scores, atol=1e-5, rtol=1e-5)


def test_reward_model_truncates_the_start_and_keeps_the_completion(reward_dir, tokenizer):
    path, model = reward_dir
    prompts, completions = _rm_examples(tokenizer)
    scores = RewardModel(str(path), max_length=4).score(prompts, completions)
    expected = torch.stack([_naive_score(model, tokenizer, p + c, max_length=4) for p, c in zip(prompts, completions)])
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


def test_reward_model_dtype_still_returns_float32(reward_dir, tokenizer):
    path, _ = reward_dir
    source = RewardModel(str(path), dtype="bfloat16")
    assert source.model.dtype == torch.bfloat16
    assert source.score(["a"], ["b"]).dtype == torch.float32
    with pytest.raises(UserError, match="unknown dtype"):
        RewardModel(str(path), dtype="int8")


def test_reward_model_with_two_labels_is_refused(tokenizer, tmp_path):
    tiny_reward_model(tokenizer, num_labels=2).save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"num_labels=2; a reward model needs a scalar head"):
        load_reward_source(str(tmp_path))


def test_causal_lm_is_not_a_reward_model(tiny_model, tmp_path):
    tiny_model.config.num_labels = 1  # even with a scalar head declared, the head weights are missing
    tiny_model.save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"not a trained reward model: weights score\.weight are missing"):
        load_reward_source(str(tmp_path))


def test_directory_without_config_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(UserError, match="not a model directory"):
        load_reward_source(str(tmp_path))


# ------------------------------------------------------------------------------------------------ dispatch


def test_dispatch(reward_module, reward_dir, tmp_path):
    assert isinstance(load_reward_source("vader"), VaderJudge)
    assert isinstance(load_reward_source("my_rewards:margin"), CallableReward)
    assert isinstance(load_reward_source(f"{reward_module}:margin"), CallableReward)
    assert isinstance(load_reward_source(str(reward_dir[0])), RewardModel)
    # An existing path wins over the module:function reading of a ':'.
    colon_dir = tmp_path / "rm:v1"
    colon_dir.symlink_to(reward_dir[0], target_is_directory=True)
    assert isinstance(load_reward_source(str(colon_dir)), RewardModel)
    for typo in ("vadr", "Vader", "runs/rm/final/"):  # a misspelt judge, a missing directory
        with pytest.raises(UserError, match=f"^unknown reward source '{typo}': not a built-in judge \\(vader, arith"):
            load_reward_source(typo)


def test_reward_model_without_a_score_head_uses_its_own_forward(tokenizer, tmp_path):
    """Encoders (here a tiny BERT) pool the first token; right padding with a mask must not move it."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    prompts, completions = _rm_examples(tokenizer)
    scores = load_reward_source(str(tmp_path), batch_size=2).score(prompts, completions)
    with torch.no_grad():
        expected = torch.stack(
            [model(torch.tensor([tokenizer(p + c).input_ids])).logits[0, 0] for p, c in zip(prompts, completions)]
        )
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


def test_a_text_starting_with_the_bos_its_tokenizer_adds_is_scored_with_one(tmp_path):
    """A chat template that writes the BOS itself, under a tokenizer that puts one in front (Llama 3, Gemma): the
    reward trainer tokenises one BOS; scoring gave two. Now the text with its BOS scores as the text without."""
    from tokenizers import processors

    from prefalign.models import load_tokenizer
    from prefalign.rewards import RewardModel

    tok = load_tokenizer()  # a fresh copy: the session's stays as it is
    bos, bos_id = tok.bos_token, tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bos_id)]
    )
    tiny_reward_model(tok, seed=1).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    rm = RewardModel(str(tmp_path))
    assert rm.tokenizer("a")["input_ids"][0] == bos_id
    prompt, completion = "User: hi\nAssistant:", " hello there"
    with_bos, without = rm.score([bos + prompt, prompt], [completion, completion]).tolist()
    ids = [bos_id] + rm.tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        trained = float(last_token_rewards(rm.model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)))
    assert with_bos == without == pytest.approx(trained, abs=1e-6)


def test_the_length_cap_is_the_model_s_position_limit(tmp_path, tokenizer):
    """An encoder with absolute positions (BERT: 64 here) scores a longer text on its last 64 tokens instead of
    failing on the position embedding."""
    from transformers import BertConfig, BertForSequenceClassification

    from prefalign.rewards import RewardModel

    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    rm = RewardModel(str(tmp_path))
    assert rm.max_length == 64
    assert math.isfinite(rm.score(["word " * 100], [" ok"]).item())  # 102 tokens: it raised a RuntimeError
