"""Keyed sampling: a completion is a pure function of (seed, row key, prompt, model), and a correct sample."""

import pytest
import torch

from prefalign.rollout import SamplingConfig, eos_token_ids, generate
from prefalign.rollout.generate import KeyedSampler, key_seed

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])  # (V,) hand-built next-token logits


def _draw(n: int, temperature=1.0, top_k=0, top_p=1.0, position=0) -> torch.Tensor:
    """Tokens drawn for ``n`` rows (keys 0..n-1) that all see ``LOGITS``; ``(n,)``."""
    sampler = KeyedSampler(
        seed=7, row_keys=list(range(n)), prompt_width=3, temperature=temperature, top_k=top_k, top_p=top_p
    )
    input_ids = torch.zeros(n, 3 + position, dtype=torch.long)  # only the width matters: position = width - 3
    out = sampler(input_ids, LOGITS.expand(n, -1).clone())
    assert ((out == 0).sum(1) == 1).all() and (out[out != 0] == float("-inf")).all()  # one finite score per row
    return out.argmax(1)


def _freqs(tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(tokens, minlength=len(LOGITS)).double() / len(tokens)


# 20000 draws: the standard error of a frequency is at most 0.0035, so 0.015 is more than 4 standard errors
N, TOL = 20000, 0.015


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_draws_follow_the_tempered_softmax(temperature):
    want = torch.softmax(LOGITS.double() / temperature, -1)
    assert torch.allclose(_freqs(_draw(N, temperature)), want, atol=TOL)


def test_top_k_keeps_k_tokens_in_proportion():
    freqs = _freqs(_draw(N, top_k=2))
    assert (freqs[2:] == 0).all()
    assert torch.allclose(freqs[:2], torch.softmax(LOGITS[:2].double(), -1), atol=TOL)


def test_top_p_keeps_the_smallest_set_with_that_mass():
    p = torch.softmax(LOGITS.double(), -1)  # 0.56, 0.21, 0.13, ...: 0.7 needs the first two, 0.85 the first three
    freqs = _freqs(_draw(N, top_p=0.7))
    assert (freqs[2:] == 0).all() and torch.allclose(freqs[:2], p[:2] / p[:2].sum(), atol=TOL)
    freqs = _freqs(_draw(N, top_p=0.85))
    assert (freqs[3:] == 0).all() and torch.allclose(freqs[:3], p[:3] / p[:3].sum(), atol=TOL)
    assert (_draw(200, top_p=0.1) == 0).all()  # the most likely token is always kept


def test_a_draw_depends_on_seed_key_and_position_only():
    a, b = _draw(64), _draw(64)
    assert torch.equal(a, b)
    assert not torch.equal(a, _draw(64, position=1))  # the next position has fresh noise
    # row k of a batch of 64 is row k of a batch of 8: the other rows do not matter
    assert torch.equal(a[:8], _draw(8))
    assert key_seed(1, 2) != key_seed(2, 1)
    assert key_seed(0, 5) == 7261477607221353902  # the same on every machine, process and run: not a salted hash


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (50, 1.0), (0, 0.9)])
def test_batched_draw_equals_the_naive_loop_over_rows(top_k, top_p):
    """`KeyedSampler.choose` (the whole batch's noise in one buffer, one max) against its docstring's loop: per row
    a fresh generator seeded by key_seed(seed, key, t), argmax(filtered_logits - log(-log(rand(V)))); a
    vocabulary of the default model's size, where near-ties are plenty."""
    gen = torch.Generator().manual_seed(0)
    keys = [key_seed(5, r) for r in range(6)]
    sampler = KeyedSampler(seed=11, row_keys=keys, prompt_width=4, temperature=0.7, top_k=top_k, top_p=top_p)
    for position in range(3):
        scores = torch.randn(len(keys), 49152, generator=gen) * 4
        want = []
        for b, key in enumerate(keys):
            g = torch.Generator().manual_seed(key_seed(11, key, position))
            u = torch.rand(49152, generator=g).clamp(min=torch.finfo(torch.float32).tiny)
            want.append(int((sampler.filtered_logits(scores)[b] - torch.log(-torch.log(u))).argmax()))
        assert sampler.choose(scores, position).tolist() == want, position


def _prompts(tokenizer):
    texts = ["The film was", "I watched it twice and", "Honestly,", "A long, slow and strangely moving story that"]
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]


def _generate(model, tokenizer, rows, keys, sampling):
    from prefalign.data import PromptCollator

    batch = PromptCollator(tokenizer.pad_token_id)(rows)
    gen = generate(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        sampling,
        eos_ids=eos_token_ids(model, tokenizer),
        pad_id=tokenizer.pad_token_id,
        tokenizer=tokenizer,
        row_keys=keys,
        seed=3,
    )
    return [ids[mask.bool()].tolist() for ids, mask in zip(gen.response_ids, gen.response_mask)], gen.ended.tolist()


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingConfig(max_new_tokens=10, temperature=0.9),
        SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9),
        SamplingConfig(max_new_tokens=10, temperature=1.0, stop=["e"]),
    ],
    ids=["plain", "top-k-top-p", "stop-string"],
)
def test_completions_do_not_depend_on_the_batch_layout(tiny_model, tokenizer, sampling):
    """4 rows in one batch, in two batches of 2 and in reverse order: the same completions (tiny fp32 model).
    Left padding differs between the layouts; a stop string ends rows at different steps."""
    rows, keys = _prompts(tokenizer), [11, 12, 13, 14]
    whole, ended = _generate(tiny_model, tokenizer, rows, keys, sampling)
    halves = [_generate(tiny_model, tokenizer, rows[i : i + 2], keys[i : i + 2], sampling) for i in (0, 2)]
    assert whole == halves[0][0] + halves[1][0] and ended == halves[0][1] + halves[1][1]
    rev, rev_ended = _generate(tiny_model, tokenizer, rows[::-1], keys[::-1], sampling)
    assert whole == rev[::-1] and ended == rev_ended[::-1]
    assert len({tuple(c) for c in whole}) == 4  # four different completions: the keys matter
    if sampling.stop:
        assert any(ended)
        for c, e in zip(whole, ended):  # a stopped row ends on its own token, not on the pad HF appends
            text = tokenizer.decode(c, skip_special_tokens=True)
            assert not e or ("e" in text and "e" not in tokenizer.decode(c[:-1], skip_special_tokens=True))


def test_ppo_rollouts_do_not_depend_on_the_batch_layout(tmp_path, tiny_model_dir, tokenizer):
    """One process: the rollout of 8 prompts equals the rollouts of its two halves (what 2 processes sample)."""
    from prefalign.trainers.ppo import PPOConfig, PPOTrainer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"review {i}: the movie was{' really' * (i % 3)}\n" for i in range(16)))
    cfg = PPOConfig(
        prompts=str(prompts),
        reward="vader",
        model=str(tiny_model_dir),
        output=str(tmp_path / "run"),
        rollout_batch_size=8,
        max_new_tokens=6,
        precision="fp32",
        temperature=1.0,
        seed=0,
    )
    trainer = PPOTrainer(cfg)
    trainer.prepare()  # backend, models and the sampling copy, as a run has them before its first step
    idx = trainer.prompt_batch(3)
    whole = trainer.rollout(idx, 3, {})
    parts = [trainer.rollout(idx[:4], 3, {}), trainer.rollout(idx[4:], 3, {})]
    assert whole.completions == parts[0].completions + parts[1].completions
    assert torch.equal(whole.scores, torch.cat([p.scores for p in parts]))
    lengths = whole.response_mask.sum(1)
    assert torch.equal(lengths, torch.cat([p.response_mask.sum(1) for p in parts]))
    for key in ("logps", "ref_logps", "values"):  # the same tokens; forwards in other batch shapes: float rounding
        for row, (part, i) in enumerate([(p, i) for p in parts for i in range(4)]):
            n = int(lengths[row])
            assert torch.allclose(getattr(whole, key)[row, :n], getattr(part, key)[i, :n], atol=1e-5), key
    # another iteration of the same prompts samples other completions
    assert trainer.rollout(idx, 4, {}).completions != whole.completions
