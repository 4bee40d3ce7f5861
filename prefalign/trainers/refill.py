"""DAPO's dynamic sampling with refill (Yu et al. 2025, "over-sample and filter"): a group whose K scores are all
equal has zero group-relative advantage, so it is replaced by the K completions of another prompt, for up to
``--resample-rounds`` more rounds of sampling per iteration; a group still equal after the last round stays in the
batch, out of the loss (`prefalign.losses.policy.informative_groups`).

Each group slot has its own chain of replacements: slot ``g`` of iteration ``s`` (its position in the global batch)
draws, in round ``r``, the prompt at position ``g`` of a permutation seeded by ``(seed, s, r)``, its K completions
keyed by ``(s, prompt, k, r)``. A slot's outcome depends only on its own chain, so the batch is the same on any
number of processes; only the number of rounds is agreed across processes (the longest any slot needs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from prefalign.losses.policy import informative_groups
from prefalign.rollout.generate import Generation


@dataclass
class Groups:
    """Scored completions, K consecutive rows per prompt (B = groups x K rows).

    gen: the completions (`Generation`: ``(B, P)`` left-padded prompts, ``(B, R)`` right-padded responses).
    prompt_rows: ``(B,)`` each row's index in the trainer's prompt list.
    prompts, texts: ``(B,)`` each row's prompt and completion text (cut at the stop strings): what was scored.
    scores: ``(B,)`` the final scores (summed over sources, clipped, missing-EOS penalty applied).
    parts: reward source name -> ``(B,)`` its unweighted scores.
    """

    gen: Generation
    prompt_rows: list[int]
    prompts: list[str]
    texts: list[str]
    scores: torch.Tensor
    parts: dict[str, torch.Tensor]

    def take(self, rows: list[int]) -> Groups:
        """The rows ``rows`` in that order; the response width trimmed to the longest response kept."""
        index = torch.tensor(rows, dtype=torch.long, device=self.scores.device)
        g = self.gen
        mask = g.response_mask[index]
        width = max(int(mask.sum(1).max().item()) if len(rows) else 0, 1)
        gen = Generation(
            g.prompt_ids[index],
            g.prompt_mask[index],
            g.response_ids[index, :width],
            mask[:, :width],
            g.ended[index],
            *(None if x is None else x[index, :width] for x in (g.logps, g.entropy)),
        )
        return Groups(
            gen,
            [self.prompt_rows[r] for r in rows],
            [self.prompts[r] for r in rows],
            [self.texts[r] for r in rows],
            self.scores[index],
            {name: part[index] for name, part in self.parts.items()},
        )

    @staticmethod
    def cat(pieces: list[Groups], pad_id: int) -> Groups:
        """The rows of every piece in order: prompts left-padded and responses right-padded with ``pad_id`` to
        the widest piece (padding is masked out, so every row's tokens keep their meaning)."""
        width_p = max(piece.gen.prompt_ids.shape[1] for piece in pieces)
        width_r = max(piece.gen.response_ids.shape[1] for piece in pieces)

        def pad(x: torch.Tensor, width: int, value: int, left: bool) -> torch.Tensor:
            extra = width - x.shape[1]
            return torch.nn.functional.pad(x, (extra, 0) if left else (0, extra), value=value)

        gen = Generation(
            torch.cat([pad(p.gen.prompt_ids, width_p, pad_id, True) for p in pieces]),
            torch.cat([pad(p.gen.prompt_mask, width_p, 0, True) for p in pieces]),
            torch.cat([pad(p.gen.response_ids, width_r, pad_id, False) for p in pieces]),
            torch.cat([pad(p.gen.response_mask, width_r, 0, False) for p in pieces]),
            torch.cat([p.gen.ended for p in pieces]),
        )
        # recorded while decoding (every round decodes alike): padded with 0 like every row past its response; each
        # of log-probs and entropy kept where every piece has it
        for field in ("logps", "entropy"):
            parts = [getattr(p.gen, field) for p in pieces]
            if all(x is not None for x in parts):
                setattr(gen, field, torch.cat([pad(x, width_r, 0, False) for x in parts]))
        return Groups(
            gen,
            [r for p in pieces for r in p.prompt_rows],
            [t for p in pieces for t in p.prompts],
            [t for p in pieces for t in p.texts],
            torch.cat([p.scores for p in pieces]),
            {name: torch.cat([p.parts[name] for p in pieces]) for name in pieces[0].parts},
        )


def group_varied(scores: torch.Tensor, k: int) -> list[bool]:
    """Per group of K consecutive rows: its scores are not all equal (it has a group-relative advantage)."""
    return informative_groups(scores, k).view(-1, k)[:, 0].tolist()


def refill(
    first: Groups,
    k: int,
    rounds: int,
    sample: Callable[[int, list[int]], Groups],
    anyone_missing: Callable[[int], bool],
    pad_id: int,
    keep_busy: bool = False,
) -> tuple[Groups, dict[str, float]]:
    """``first`` with each group of equal scores replaced by a varied group of a later round, where one came.

    Args:
        first: this process's batch, round 0 (G groups of K rows).
        sample: ``sample(r, slots)`` -> the K scored completions of slot ``slots[j]``'s round-``r`` prompt, for
            every ``j`` (group ``j`` of the result).
        anyone_missing: ``anyone_missing(n)`` -> whether any process still has a slot to refill (``n``: this
            process's count). A collective, called once per round on every process.
        keep_busy: a process with nothing to refill still samples (slot 0, discarded) in every round, as a
            sharded model needs every process in every generation.
    Returns:
        ``(groups, stats)``: the batch (the same G slots in order) and ``refill/rounds``, ``refill/groups``
        (slots refilled), ``refill/completions`` (every completion sampled, round 0 included), ``refill/tokens``
        (their response tokens).
    """
    pieces, picks = [first], [(0, g) for g in range(len(first.texts) // k)]
    missing = [g for g, varied in enumerate(group_varied(first.scores, k)) if not varied]
    sampled, ran = len(first.texts), 0
    tokens = float(first.gen.response_mask.sum())  # every round's, as the generation time counts every round
    for r in range(1, rounds + 1):
        if not anyone_missing(len(missing)):
            break
        ran = r
        if not (missing or keep_busy):
            continue
        slots = list(missing)
        new = sample(r, slots or [0])
        sampled += len(new.texts)
        tokens += float(new.gen.response_mask.sum())
        if not slots:
            continue  # sampled only to keep a sharded model's processes in step
        pieces.append(new)
        for j, (g, varied) in enumerate(zip(slots, group_varied(new.scores, k))):
            if varied:
                picks[g] = (len(pieces) - 1, j)
        missing = [g for g in slots if picks[g][0] == 0]
    stats = {
        "refill/rounds": float(ran),
        "refill/groups": float(sum(piece > 0 for piece, _ in picks)),
        "refill/completions": float(sampled),
        "refill/tokens": tokens,
    }
    if len(pieces) == 1:
        return first, stats
    starts = [0]
    for piece in pieces[:-1]:
        starts.append(starts[-1] + len(piece.texts))
    rows = [starts[piece] + group * k + j for piece, group in picks for j in range(k)]
    return Groups.cat(pieces, pad_id).take(rows), stats
