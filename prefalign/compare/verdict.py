"""The classic PPO-RLHF vs DPO table, tested: four claims, what the race measured for each, and a verdict.

Each row puts the textbook claim for PPO-RLHF beside the one for DPO, the measurements of every arm present
(PPO-RLHF, then the critic-free GRPO and RLOO measured the same way, then DPO) and exactly one of `VERDICTS`,
with a one-sentence reason quoting the numbers that decide it. The verdict is about PPO-RLHF vs DPO; the
GRPO and RLOO columns are notes. Decision rules (intervals from `prefalign.compare.stats`, `CONFIDENCE`):

1. Reward model: DPO's implicit reward ranks held-out pairs about as well as the explicit reward model.
   Interval of (DPO accuracy - RM accuracy), paired by seed and pair, crossed over seeds and held-out prompts
   (`HeldOutPairs`; over seeds alone where `prefalign.compare.evidence.heldout_pairs` gives none: a run without
   per-pair outcomes, runs that held out other pairs, pairs of one prompt): holds if its low end > -`MARGIN`
   (non-inferiority), does not hold if its high end < -`MARGIN`, else inconclusive; one seed: inconclusive.
2. Policy update: holds if every online arm generated tokens while training (every seed) and DPO none
   beyond the shared pairs; otherwise does not hold.
3. Loss: both losses raise the gold score over the start: holds if PPO-RLHF's and DPO's paired gain
   intervals both lie above 0, does not hold if either lies below 0 (that loss lowered it), else inconclusive;
   one seed: inconclusive (a one-seed interval holds the prompts' variance alone, not the seeds').
4. Cost and sample efficiency: (a) PPO-RLHF's wall time and peak memory above DPO's (seed intervals of the
   per-seed differences; one seed: inconclusive, as a point says nothing of the seed-to-seed noise); (b) DPO's
   gold gain per preference pair above PPO-RLHF's (`efficiency_difference`; one seed: inconclusive, as in 3).
   Holds if (a) and (b) hold; does not hold if either is reversed (its interval lies on the wrong side of 0);
   else inconclusive.

Everything here reads plain dicts and arrays: the caller (the summary) reads the files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from prefalign.compare.arms import ARMS
from prefalign.compare.evidence import HeldOutPairs
from prefalign.compare.stats import (
    START,
    Interval,
    PolicyScores,
    efficiency_difference,
    paired_difference,
    seed_interval,
)

HOLDS = "holds"
DOES_NOT_HOLD = "does not hold"
INCONCLUSIVE = "inconclusive at this budget"
VERDICTS = (HOLDS, DOES_NOT_HOLD, INCONCLUSIVE)
MARGIN = 0.05
"""Row 1's non-inferiority margin in held-out pair accuracy: DPO may rank up to 5 points worse and still
count as "about as well" (a difference a reader would not act on at a few hundred held-out pairs)."""
TABLE_ARMS = ("ppo", "grpo", "rloo", "dpo")
"""The table's columns, in order; other arms of the race are not in it."""
COST_KEYS = ("wall_seconds", "peak_rss_mb", "gradient_steps", "tokens_generated_training", "pairs_used")


@dataclass(frozen=True)
class VerdictInputs:
    """What the table is decided from; build it with `verdict_inputs`, which checks it."""

    arms: tuple[str, ...]
    """The table's arms present, in `TABLE_ARMS` order."""
    costs: Mapping[str, Sequence[Mapping[str, float]]]
    """Per arm, one dict per seed: `COST_KEYS` (wall_seconds: the arm's total; tokens_generated_training: tokens
    sampled while training, the shared pair making not counted), and for ppo optionally ``rm_wall_seconds``
    and ``rm_gradient_steps`` (its reward model's share)."""
    scores: Mapping[str, PolicyScores]
    """Per arm and `START`: the evaluation's arrays (`prefalign.compare.stats.from_completions`)."""
    rm_accuracy: tuple[float, ...]
    """The reward model's held-out pair accuracy per seed; () when not measured."""
    dpo_accuracy: tuple[float, ...]
    """DPO's implicit reward's held-out pair accuracy per seed; () when not measured."""
    pairs: HeldOutPairs | None = None
    """Each held-out pair's outcome per seed, for row 1's interval over seeds and prompts; None: not recorded
    (the interval is then over seeds alone)."""

    def per_seed(self, arm: str, key: str) -> list[float]:
        return [float(cost[key]) for cost in self.costs[arm]]

    def mean(self, arm: str, key: str) -> float:
        return float(np.mean(self.per_seed(arm, key)))

    def gain(self, arm: str) -> np.ndarray:
        """(S, P): the arm's gold score over the start's, per seed and prompt."""
        return self.scores[arm].gold_per_prompt - self.scores[START].gold_per_prompt


@dataclass(frozen=True)
class VerdictRow:
    """One claim of the table."""

    topic: str
    claim_ppo: str
    claim_dpo: str
    measured: dict[str, str]
    """Arm label -> what was measured for it."""
    verdict: str
    """One of `VERDICTS`."""
    reason: str
    """One sentence with the numbers and intervals that decide it."""
    evidence: dict[str, dict] = field(default_factory=dict)
    """The deciding intervals, by name, as `Interval.to_dict` (for summary.json)."""

    def to_dict(self) -> dict:
        return asdict(self)


def verdict_inputs(
    arms: Sequence[str],
    costs: Mapping[str, Sequence[Mapping[str, float]]],
    scores: Mapping[str, PolicyScores],
    rm_accuracy: Sequence[float | None] = (),
    dpo_accuracy: Sequence[float | None] = (),
    pairs: HeldOutPairs | None = None,
) -> VerdictInputs:
    """Check and gather the table's inputs (see `VerdictInputs`); arms outside `TABLE_ARMS` are dropped, and an
    accuracy list holding None (a seed that never evaluated) counts as not measured."""
    present = tuple(arm for arm in TABLE_ARMS if arm in arms)
    if present and START not in scores:
        raise ValueError(f"verdict: no scores of the starting policy {START!r}")
    n_seeds = {scores[arm].gold.shape[0] for arm in present if arm in scores}
    if len(n_seeds) > 1:
        raise ValueError(f"verdict: the arms' scores have different numbers of seeds: {sorted(n_seeds)}")
    for arm in present:
        if arm not in scores:
            raise ValueError(f"verdict: no scores of arm {arm!r}")
        seeds = scores[arm].gold.shape[0]
        if len(costs.get(arm, ())) != seeds:
            raise ValueError(f"verdict: arm {arm!r} has {len(costs.get(arm, ()))} seeds of costs, {seeds} of scores")
        missing = sorted({key for cost in costs[arm] for key in COST_KEYS if key not in cost})
        if missing:
            raise ValueError(f"verdict: the costs of arm {arm!r} lack {missing}")
    accuracies = []
    for name, values in (("reward model", rm_accuracy), ("DPO", dpo_accuracy)):
        if values and n_seeds and len(values) not in n_seeds:
            raise ValueError(f"verdict: {len(values)} {name} accuracies for {next(iter(n_seeds))} seeds")
        accuracies.append(() if any(v is None for v in values) else tuple(float(v) for v in values if v is not None))
    if not (accuracies[0] and accuracies[1]):
        pairs = None  # an accuracy not measured (or not finite) decides row 1; its pairs' outcomes mean nothing
    if pairs is not None:
        _check_pairs(pairs, len(accuracies[0]))
    return VerdictInputs(present, costs, scores, accuracies[0], accuracies[1], pairs)


def _check_pairs(pairs: HeldOutPairs, n_seeds: int) -> None:
    """``pairs`` holds (S, N) outcomes of 0 / 1 for the seeds of the accuracies, over at least 2 prompts."""
    shape = (n_seeds, len(pairs.prompts))
    if pairs.rm.shape != shape or pairs.dpo.shape != shape:
        raise ValueError(f"verdict: held-out pair outcomes {pairs.rm.shape}, {pairs.dpo.shape}; expected {shape}")
    if not all(np.isin(x, (0.0, 1.0)).all() for x in (pairs.rm, pairs.dpo)):
        raise ValueError("verdict: a held-out pair outcome is not 0 or 1")
    if len(set(pairs.prompts)) < 2:
        raise ValueError("verdict: the held-out pairs come from fewer than 2 prompts; an interval needs 2")


def verdict_rows(inputs: VerdictInputs) -> list[VerdictRow]:
    """The four rows, or [] when PPO-RLHF or DPO is not in the race (the table compares those two)."""
    if "ppo" not in inputs.arms or "dpo" not in inputs.arms:
        return []
    start = inputs.scores[START].gold_per_prompt
    gains = {arm: paired_difference(inputs.scores[arm].gold_per_prompt, start) for arm in inputs.arms}
    return [_reward_model_row(inputs), _policy_update_row(inputs), _loss_row(inputs, gains), _cost_row(inputs, gains)]


def _label(arm: str) -> str:
    return ARMS[arm].label


def _reward_model_row(inputs: VerdictInputs) -> VerdictRow:
    measured = {}
    for arm in inputs.arms:
        if arm == "dpo":
            measured[_label(arm)] = f"implicit reward: held-out pair accuracy {_accuracy(inputs, 'dpo')}"
        elif arm == "ppo":
            measured[_label(arm)] = f"reward model: held-out pair accuracy {_accuracy(inputs, 'rm')}" + (
                f"; trained in {_seconds(inputs.mean(arm, 'rm_wall_seconds'))}, "
                f"{_count(inputs.mean(arm, 'rm_gradient_steps'))} gradient steps"
                if all("rm_wall_seconds" in c and "rm_gradient_steps" in c for c in inputs.costs[arm])
                else ""
            )
        else:
            measured[_label(arm)] = "the same reward model as PPO-RLHF"
    verdict, reason, evidence = _reward_model_verdict(inputs)
    claims = (
        "a separate reward model, trained explicitly on the pairs",
        "none: the policy is its own (implicit) reward",
    )
    return VerdictRow("Reward model", *claims, measured, verdict, reason, evidence)


def _reward_model_verdict(inputs: VerdictInputs) -> tuple[str, str, dict]:
    rm, dpo, pairs = inputs.rm_accuracy, inputs.dpo_accuracy, inputs.pairs
    if not rm or not dpo:
        missing = " and ".join(name for name, acc in (("the reward model", rm), ("DPO", dpo)) if not acc)
        return INCONCLUSIVE, f"the held-out pair accuracy of {missing} was not measured.", {}
    if pairs is None:
        diff = seed_interval([d - r for d, r in zip(dpo, rm, strict=True)], bounds=(-1.0, 1.0))
        over = f"over {len(rm)} seeds"
    else:
        diff = pairs.difference()
        seeds = "1 seed" if len(rm) == 1 else f"{len(rm)} seeds"
        over = f"over {seeds} and {len(set(pairs.prompts))} held-out prompts ({len(pairs.prompts)} pairs)"
    evidence = {"accuracy_difference": diff.to_dict()}
    said = "DPO's implicit reward minus the reward model in held-out pair accuracy: "
    if len(rm) == 1:
        if pairs is None:
            point = f"{_signed(diff.mean)} from one seed, a point with no interval to test a margin of {MARGIN}."
        else:
            point = f"{_bounds(diff, _signed)} {over}: from one seed, {ONE_SEED}."
        return INCONCLUSIVE, said + point, evidence
    said += f"{_bounds(diff, _signed)} {over}"
    if diff.above(-MARGIN):
        return HOLDS, f"{said}, all above -{MARGIN} (non-inferior).", evidence
    if diff.below(-MARGIN):
        return DOES_NOT_HOLD, f"{said}, all below -{MARGIN} (worse by more than the margin).", evidence
    return INCONCLUSIVE, f"{said}, which straddles the margin -{MARGIN}.", evidence


def _policy_update_row(inputs: VerdictInputs) -> VerdictRow:
    tokens = {arm: inputs.per_seed(arm, "tokens_generated_training") for arm in inputs.arms}
    measured = {
        _label(arm): f"{_count(float(np.mean(tokens[arm])))} tokens generated while training; "
        f"{_count(inputs.mean(arm, 'gradient_steps'))} gradient steps"
        for arm in inputs.arms
    }
    online = [arm for arm in inputs.arms if ARMS[arm].family.online]
    sampled = all(min(tokens[arm]) > 0 for arm in online)
    offline = max(tokens["dpo"]) == 0
    said = ", ".join(f"{_label(arm)} {_count(float(np.mean(tokens[arm])))}" for arm in online)
    reason = f"tokens generated while training (mean over seeds): {said}; DPO {_count(float(np.mean(tokens['dpo'])))}"
    if sampled and offline:
        verdict, reason = HOLDS, reason + " beyond the shared pairs."
    else:
        verdict = DOES_NOT_HOLD
        reason += (" (an online arm sampled nothing in some seed)." if not sampled else "") + (
            " (DPO generated tokens beyond the pairs)." if not offline else ""
        )
    claims = ("RL: samples its own completions while training", "supervised on a fixed, offline set of pairs")
    return VerdictRow("Policy update", *claims, measured, verdict, reason)


def _loss_row(inputs: VerdictInputs, gains: dict[str, Interval]) -> VerdictRow:
    measured = {
        _label(arm): f"gold {inputs.scores[arm].gold.mean():.3f} ({_bounds(gains[arm], _signed)} over the start); "
        f"KL {inputs.scores[arm].kl.mean():.3f} nats"
        for arm in inputs.arms
    }
    ppo, dpo = gains["ppo"], gains["dpo"]
    said = f"gold gain over the start: PPO-RLHF {_bounds(ppo, _signed)}, DPO {_bounds(dpo, _signed)}"
    if _one_seed(inputs):
        verdict, reason = INCONCLUSIVE, f"{said} from one seed: {ONE_SEED}."
    elif ppo.above() and dpo.above():
        verdict, reason = HOLDS, f"{said}: both above 0."
    elif ppo.below() or dpo.below():
        lowered = " and ".join(name for name, gain in (("PPO-RLHF", ppo), ("DPO", dpo)) if gain.below())
        verdict, reason = DOES_NOT_HOLD, f"{said}: {lowered} lowered the gold score."
    else:
        verdict, reason = INCONCLUSIVE, f"{said}: an interval includes 0."
    claims = (
        "advantage-weighted policy gradient (clipped surrogate, A from GAE on a value model)",
        "a preference (classification) loss on pairs",
    )
    evidence = {f"gain_{arm}": gains[arm].to_dict() for arm in inputs.arms}
    return VerdictRow("Loss", *claims, measured, verdict, reason, evidence)


def _cost_row(inputs: VerdictInputs, gains: dict[str, Interval]) -> VerdictRow:
    measured = {_label(arm): _cost_cell(inputs, arm, gains[arm].mean) for arm in inputs.arms}
    # a GPU race compares GPU memory (every PPO-RLHF and DPO seed recorded its peak); a CPU race host RSS
    gpu = all(cost.get("peak_gpu_mb") is not None for arm in ("ppo", "dpo") for cost in inputs.costs[arm])
    memory_key = "peak_gpu_mb" if gpu else "peak_rss_mb"
    diff = {
        key: seed_interval([p - d for p, d in zip(inputs.per_seed("ppo", key), inputs.per_seed("dpo", key))])
        for key in ("wall_seconds", memory_key)
    }
    wall, memory = diff["wall_seconds"], diff[memory_key]
    one_seed = _one_seed(inputs)  # a point: nothing measures how another seed's run would move it
    cost = INCONCLUSIVE if one_seed else _part(wall.above() and memory.above(), wall.below() or memory.below())
    cost_said = (
        f"PPO-RLHF minus DPO: wall {_bounds(wall, _signed_seconds)}, peak {'GPU ' if gpu else ''}memory "
        f"{_bounds(memory, _signed_gib)}" + (" from one seed, points with no interval" if one_seed else "")
    )
    evidence = {"wall_seconds_difference": wall.to_dict(), f"{memory_key}_difference": memory.to_dict()}
    pairs_dpo, pairs_ppo = inputs.per_seed("dpo", "pairs_used"), inputs.per_seed("ppo", "pairs_used")
    if min(pairs_dpo + pairs_ppo) > 0:
        eff = efficiency_difference(inputs.gain("dpo"), pairs_dpo, inputs.gain("ppo"), pairs_ppo)
        efficiency = INCONCLUSIVE if one_seed else _part(eff.above(), eff.below())
        eff_said = f"DPO minus PPO-RLHF in gold gain per preference pair: {_bounds(eff, _efficiency)}" + (
            f" from one seed: {ONE_SEED}" if one_seed else ""
        )
        evidence["gain_per_pair_difference"] = eff.to_dict()
    else:
        efficiency, eff_said = INCONCLUSIVE, "gain per pair not measured (a pair count is 0)"
    if DOES_NOT_HOLD in (cost, efficiency):
        verdict = DOES_NOT_HOLD
    else:
        verdict = HOLDS if cost == efficiency == HOLDS else INCONCLUSIVE
    reason = f"cost {cost} ({cost_said}); sample efficiency {efficiency} ({eff_said})."
    claims = ("relatively large compute cost, low sample efficiency", "relatively small cost, high sample efficiency")
    return VerdictRow("Compute cost and sample efficiency", *claims, measured, verdict, reason, evidence)


ONE_SEED = "its interval holds the prompts' variance, not the seed-to-seed one"
"""Why one seed decides no row: a training run's own chance is what a claim about a method must outlast."""


def _one_seed(inputs: VerdictInputs) -> bool:
    return len(inputs.costs["ppo"]) == 1


def _gpu(inputs: VerdictInputs, arm: str) -> str:
    """`` (GPU x GiB)``: the arm's mean GPU peak where every seed recorded one."""
    peaks = [cost.get("peak_gpu_mb") for cost in inputs.costs[arm]]
    known = [float(p) for p in peaks if p is not None]
    return f" (GPU {_gib(float(np.mean(known)))})" if known and len(known) == len(peaks) else ""


def _part(holds: bool, reversed_: bool) -> str:
    """One part of row 4: holds, does not hold (reversed), or inconclusive."""
    return HOLDS if holds else DOES_NOT_HOLD if reversed_ else INCONCLUSIVE


def _cost_cell(inputs: VerdictInputs, arm: str, gain: float) -> str:
    costs = {key: inputs.mean(arm, key) for key in COST_KEYS}
    per = {"pair": costs["pairs_used"], "step": costs["gradient_steps"], "minute": costs["wall_seconds"] / 60}
    return (
        f"wall {_seconds(costs['wall_seconds'])}, peak {_gib(costs['peak_rss_mb'])}{_gpu(inputs, arm)}, "
        f"{_count(costs['gradient_steps'])} steps, {_count(costs['tokens_generated_training'])} tokens, "
        f"{_count(costs['pairs_used'])} pairs; gold gain "
        + ", ".join(f"per {unit} {_efficiency(gain / cost) if cost > 0 else 'n/a'}" for unit, cost in per.items())
    )


# ---------------------------------------------------------------------------------------------- numbers


def _signed(x: float) -> str:
    return f"{x:+.3f}"


def _accuracy(inputs: VerdictInputs, which: str) -> str:
    """``which`` (rm or dpo)'s held-out pair accuracy: over seeds and prompts where the pairs were recorded."""
    values = inputs.rm_accuracy if which == "rm" else inputs.dpo_accuracy
    if not values:
        return "not measured"
    if inputs.pairs is not None:
        seeds = "1 seed" if len(values) == 1 else f"{len(values)} seeds"
        return f"{_bounds(inputs.pairs.accuracy(which), lambda x: f'{x:.3f}')} ({seeds} x prompts)"
    acc = seed_interval(values, bounds=(0.0, 1.0))
    return f"{acc.mean:.3f}" if len(values) == 1 else f"{_bounds(acc, lambda x: f'{x:.3f}')} ({len(values)} seeds)"


def _bounds(interval: Interval, fmt) -> str:
    """``mean [low, high]``, or the mean alone for a point (low == high == mean, as one seed's)."""
    if interval.low == interval.high == interval.mean:
        return fmt(interval.mean)
    return f"{fmt(interval.mean)} [{fmt(interval.low)}, {fmt(interval.high)}]"


def _seconds(seconds: float) -> str:
    """83 -> 1m23s; under a minute 42 s; from an hour 1h05m."""
    s = round(seconds)
    if s < 60:
        return f"{seconds:.0f} s"
    return f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def _signed_seconds(seconds: float) -> str:
    return ("-" if seconds < 0 else "+") + _seconds(abs(seconds))


def _gib(mb: float) -> str:
    return f"{mb / 1024:.2f} GiB"


def _signed_gib(mb: float) -> str:
    return f"{mb / 1024:+.2f} GiB"


def _count(n: float) -> str:
    """1234567 -> 1.2M; 45300 -> 45.3k; under 10,000 in full (2,000)."""
    if abs(n) >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.1f}k" if abs(n) >= 1e4 else f"{n:,.0f}"


def _efficiency(x: float) -> str:
    return f"{x:+.3g}"
