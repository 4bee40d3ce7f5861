"""Sampling and scoring shared by ``generate``, ``prefs`` and ``eval``: K completions per prompt, their summed
log-probs.

All three commands sample through `sample_completions` (`prefalign.rollout.generate` underneath: left-padded
prompts, responses cut after the first EOS, text cut at the first stop string, keyed noise): the same model, seed and
settings give the same completions in every command, at any batch size. Each response keeps its token ids, so ``eval``
can score exactly the sampled tokens under another model afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefalign.progress import ProgressBar
from prefalign.rollout.generate import SamplingConfig


@dataclass
class Sample:
    """One sampled completion of prompt ``prompt`` (its ``sample``-th)."""

    prompt: int
    """Index into the prompt list."""
    sample: int
    """0 .. num_samples - 1."""
    text: str
    """Decoded completion, without the EOS, cut at the first stop string."""
    response_ids: list[int]
    """Sampled token ids, cut after the first EOS (the EOS kept when the response ended)."""
    ended: bool
    """The response ended with EOS or a stop string (not by running out of tokens)."""


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sample_completions(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    sampling: SamplingConfig,
    num_samples: int,
    batch_size: int,
    seed: int,
    desc: str = "sample",
) -> list[Sample]:
    """``num_samples`` completions of every prompt, in (prompt, sample) order, ``batch_size`` rows at a time.

    Keyed sampling (`KeyedSampler`): completion ``k`` of prompt ``i`` draws its noise from a stream keyed by
    (``seed``, i, k), so it does not depend on the batch size, and two policies sampled with the same seed share
    their random numbers (common random numbers: their gold difference and win rate are less noisy, and
    identical policies give identical completions).
    """
    from prefalign.data import PromptCollator
    from prefalign.rollout import cut_at_stop, eos_token_ids, generate
    from prefalign.rollout.decode import PackedLinears
    from prefalign.rollout.generate import key_seed

    dev = next(model.parameters()).device
    collate = PromptCollator(tokenizer.pad_token_id)
    eos = eos_token_ids(model, tokenizer)
    jobs = [(i, k) for i in range(len(prompt_ids)) for k in range(num_samples)]
    out: list[Sample] = []
    packed = PackedLinears(model, batch_hint=batch_size)  # the weights do not change here: pack once, not per batch
    with ProgressBar(total=len(jobs), desc=desc, unit="completion") as bar:
        for lo in range(0, len(jobs), batch_size):
            chunk = jobs[lo : lo + batch_size]
            batch = collate([prompt_ids[i] for i, _ in chunk])
            gen = generate(
                model,
                batch["input_ids"].to(dev),
                batch["attention_mask"].to(dev),
                sampling,
                eos_ids=eos,
                pad_id=tokenizer.pad_token_id,
                tokenizer=tokenizer,
                row_keys=[key_seed(i, k) for i, k in chunk],
                seed=seed,
                packed=packed,
            )
            texts = tokenizer.batch_decode(gen.response_ids, skip_special_tokens=True)
            ids = gen.response_ids.cpu()  # (b, R)
            lengths = gen.response_mask.sum(1).tolist()  # (b,)
            for row, ((i, k), text, n, ended) in enumerate(zip(chunk, texts, lengths, gen.ended.tolist())):
                out.append(Sample(i, k, cut_at_stop(text, sampling.stop), ids[row, : int(n)].tolist(), bool(ended)))
            bar.update(len(chunk))
    packed.release()
    return out


@torch.no_grad()
def sequence_logps(
    model,
    prompt_ids: list[list[int]],
    samples: list[Sample],
    batch_size: int,
    temperature: float,
    pad_id: int,
    desc: str = "log-probs",
) -> torch.Tensor:
    """``(N,)`` float32: per sample, the sum over its response tokens of ``log p(token | prefix)`` at ``temperature``.

    Batches are formed in the order of ``samples`` (``batch_size`` at a time), so two models scored on
    the same samples see identical batches: equal weights give bit-identical sums.
    """
    from prefalign.data import SFTCollator, TokenizedSFT
    from prefalign.models.logprobs import completion_logprobs, sequence_logprobs

    dev = next(model.parameters()).device
    collate = SFTCollator(pad_id)
    was_training = model.training
    model.eval()
    sums: list[torch.Tensor] = []
    try:
        for lo in ProgressBar(range(0, len(samples), batch_size), desc=desc, unit="batch"):
            chunk = samples[lo : lo + batch_size]
            batch = collate([TokenizedSFT(prompt_ids[s.prompt], s.response_ids) for s in chunk])
            batch = {k: v.to(dev) for k, v in batch.items()}  # each (b, T), right-padded
            logps = completion_logprobs(
                model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], temperature=temperature
            )  # (b, T)
            sums.append(sequence_logprobs(logps, batch["completion_mask"]).float().cpu())  # (b,)
    finally:
        model.train(was_training)
    return torch.cat(sums) if sums else torch.zeros(0)


def score_samples(
    source, name: str, prompts: list[str], samples: list[Sample], columns: dict[str, list] | None = None
) -> torch.Tensor:
    """``(N,)`` scores of the samples' texts by a reward source; ``name`` (``"--judge vader"``) names it in errors.

    ``columns``: the prompt rows' other columns, one value per prompt (`prefalign.data.prompts.read_prompt_rows`);
    each sample gets its prompt's values (the ``answer`` of the ``arithmetic`` judge, a ``module:function``'s
    keyword arguments)."""
    from prefalign.data import take_rows
    from prefalign.rewards import check_scores, score_with_columns

    if not samples:
        return torch.zeros(0)
    rows = [s.prompt for s in samples]
    texts = [s.text for s in samples]
    sample_columns = take_rows(columns, rows) if columns is not None else None
    return check_scores(score_with_columns(source, [prompts[i] for i in rows], texts, sample_columns), len(texts), name)
