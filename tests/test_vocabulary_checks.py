"""A model that reads the policy's token ids (a reference, a critic) must share its vocabulary: refused in one line
otherwise (`prefalign.models.loading.require_same_vocabulary`), by dpo and ppo before any step."""

import copy

import pytest
from conftest import tiny_reward_model, trainer_kwargs
from transformers import LlamaConfig, LlamaForCausalLM

from prefalign.errors import UserError
from prefalign.models import tiny_causal_lm
from prefalign.models.loading import load_causal_lm, require_same_vocabulary
from prefalign.trainers.dpo import DPOConfig, DPOTrainer
from prefalign.trainers.ppo import PPOConfig, PPOTrainer


@pytest.fixture(scope="module")
def other_tokenizer(tokenizer):
    """A word-level tokenizer of a few words: the policy's token ids mean other tokens (or nothing) to it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "the", "movie", "was", "good", "bad"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>")
    return tok


def _saved(path, model, tok):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def extended_dir(tmp_path_factory, tokenizer):
    """The default tokenizer with one token added (as a reward model's [PAD]): every policy id keeps its token."""
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(["<prefalign-extra-token>"])
    return _saved(tmp_path_factory.mktemp("extended"), tiny_causal_lm(tok)[0], tok)


@pytest.fixture(scope="module")
def other_lm_dir(tmp_path_factory, tokenizer, other_tokenizer):
    # enough embeddings for the policy's ids: only the tokenizer's mapping differs
    return _saved(tmp_path_factory.mktemp("other-lm"), tiny_causal_lm(tokenizer)[0], other_tokenizer)


@pytest.fixture(scope="module")
def other_rm_dir(tmp_path_factory, tokenizer, other_tokenizer):
    return _saved(tmp_path_factory.mktemp("other-rm"), tiny_reward_model(tokenizer), other_tokenizer)


def _weights_only(path, vocab):
    """A tiny causal LM of ``vocab`` token embeddings saved without tokenizer files."""
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_require_same_vocabulary_by_case(tmp_path, tokenizer, tiny_model_dir, other_lm_dir, extended_dir):
    require_same_vocabulary(load_causal_lm(str(tiny_model_dir)), str(tiny_model_dir), tokenizer, "--ref same")
    require_same_vocabulary(load_causal_lm(str(extended_dir)), str(extended_dir), tokenizer, "--ref extended")
    with pytest.raises(UserError, match=r"^--ref x: its tokenizer's vocabulary differs from --model's; it must read"):
        require_same_vocabulary(load_causal_lm(str(other_lm_dir)), str(other_lm_dir), tokenizer, "--ref x")
    # no tokenizer files: the embedding count is what can be checked
    small = _weights_only(tmp_path / "small", 1000)
    with pytest.raises(UserError, match=rf"^--ref y: 1000 token embeddings for --model's {len(tokenizer)} tokens"):
        require_same_vocabulary(load_causal_lm(str(small)), str(small), tokenizer, "--ref y")
    whole = _weights_only(tmp_path / "whole", len(tokenizer))
    require_same_vocabulary(load_causal_lm(str(whole)), str(whole), tokenizer, "--ref z")


def test_dpo_refuses_a_reference_of_another_vocabulary(tmp_path, tiny_model_dir, other_lm_dir, pairs):
    trainer = DPOTrainer(DPOConfig(**trainer_kwargs(tmp_path, tiny_model_dir, pairs, ref=str(other_lm_dir))))
    with pytest.raises(UserError, match=r"^--ref .*other-lm.*: its tokenizer's vocabulary differs from --model's"):
        trainer.train()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _ppo(tmp_path, model_dir, prompts, **kw):
    base = dict(prompts=str(prompts), model=str(model_dir), output=str(tmp_path / "run"), max_steps=1)
    return PPOTrainer(PPOConfig(**{**base, "rollout_batch_size": 4, "max_new_tokens": 4, **kw}))


@pytest.fixture()
def prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("".join(f"review {i}: the movie was\n" for i in range(8)))
    return p


def test_ppo_refuses_a_critic_or_reference_of_another_vocabulary(
    tmp_path, tiny_model_dir, tiny_reward_model_dir, other_lm_dir, other_rm_dir, prompts
):
    # a reward model scores with its own tokenizer, but the critic initialised from it reads the policy's ids
    with pytest.raises(UserError, match=r"^--reward .*other-rm.* \(the critic's initialisation: pass --value-model"):
        _ppo(tmp_path, tiny_model_dir, prompts, reward=str(other_rm_dir)).train()
    with pytest.raises(UserError, match=r"^--value-model .*other-rm.*: its tokenizer's vocabulary differs"):
        _ppo(tmp_path, tiny_model_dir, prompts, reward="vader", value_model=str(other_rm_dir)).train()
    with pytest.raises(UserError, match=r"^--ref .*other-lm.*: its tokenizer's vocabulary differs"):
        _ppo(tmp_path, tiny_model_dir, prompts, reward=str(tiny_reward_model_dir), ref=str(other_lm_dir)).train()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
