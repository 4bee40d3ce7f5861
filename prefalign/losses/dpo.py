"""The DPO family of offline preference losses, each variant one entry of the table `DPO_LOSSES`.

An entry (`DPOVariant`) says everything about a variant: its per-pair function, whether it needs
reference log-probs, whether it wants *length-averaged* (per-token mean) log-probs instead of summed
ones, its hyperparameters (name = the ``DPOConfig`` field, default, allowed range, help) and a help
line naming its formula and paper. The trainer, its config checks and ``prefalign dpo --help`` read
the table; `dpo_pair_loss` is the one entry point (checks, looks the variant up, calls it), `dpo_loss` its mean.

Most variants are functions of the implicit-reward logit

    h = (logp_c - ref_c) - (logp_r - ref_r)

(``c`` chosen, ``r`` rejected); the reference-free ones (reference_free, simpo, orpo) use the
policy's log-probs alone. A per-pair function takes a `PairLogps` of ``(B,)`` tensors and its
hyperparameters as keyword arguments, and returns a `PairLoss` (per-pair losses and rewards), so a
new variant is one function and one entry (a hyperparameter name no entry had before also needs its
field, with a docstring, in `prefalign.trainers.dpo.DPOConfig`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from prefalign.losses.stats import check_same_shape

NOTATION = (
    "h = (logp_c - ref_c) - (logp_r - ref_r), logp a completion's summed log-prob under the policy, ref "
    "under the reference; avg_logp its per-token mean"
)
"""The terms the variants' help lines use (``c`` chosen, ``r`` rejected): ``--loss-type``'s help and model cards."""


@dataclass(frozen=True)
class PairLogps:
    """A batch of preference pairs, every field ``(B,)``: chosen / rejected, the policy's log-prob of each completion
    given its prompt, summed over its tokens (the per-token mean where the variant is ``length_averaged``);
    ref_chosen / ref_rejected, the same under the frozen reference, None for variants that take no reference."""

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None

    def log_ratios(self) -> tuple[Tensor, Tensor]:
        """``(log(pi_c / ref_c), log(pi_r / ref_r))``, each ``(B,)``; the reference is a constant."""
        if self.ref_chosen is None or self.ref_rejected is None:
            raise ValueError("log_ratios needs the reference log-probs ref_chosen and ref_rejected")
        return self.chosen - self.ref_chosen.detach(), self.rejected - self.ref_rejected.detach()


@dataclass(frozen=True)
class PairLoss:
    """What a per-pair function returns; every tensor ``(B,)``."""

    losses: Tensor
    """Per-pair loss; `dpo_loss` returns its mean."""
    chosen_rewards: Tensor
    """The variant's reward of each chosen completion (the rewards/* stats; a held-out pair's margin)."""
    rejected_rewards: Tensor
    """The same for the rejected completion."""
    extra: dict[str, Tensor] = field(default_factory=dict)
    """Further per-pair diagnostics, logged as their batch mean under their key."""


@dataclass(frozen=True)
class HyperParam:
    """A variant's hyperparameter: the allowed range is ``low < v < high``, each end closed if said."""

    name: str
    """The ``DPOConfig`` field (flag ``--name-with-dashes``) and the keyword of `dpo_loss`."""
    default: float
    low: float
    help: str
    low_closed: bool = False
    high: float = math.inf
    high_closed: bool = False

    def allowed(self) -> str:
        """The range in words: ``> 0``, ``>= 0``, ``in [0, 0.5)``."""
        if self.high == math.inf:
            return f"{'>=' if self.low_closed else '>'} {self.low:g}"
        return f"in {'[' if self.low_closed else '('}{self.low:g}, {self.high:g}{']' if self.high_closed else ')'}"

    def check(self, value: float, label: str | None = None) -> None:
        """Raise ValueError naming ``label`` (default: the name) when ``value`` is outside the range."""
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        if not (above and below):  # NaN fails both
            raise ValueError(f"{label or self.name} must be {self.allowed()}, got {value}")


@dataclass(frozen=True)
class DPOVariant:
    """One entry of `DPO_LOSSES`."""

    name: str
    fn: Callable[..., PairLoss]
    """``fn(pairs: PairLogps, **hyperparams) -> PairLoss``, called with exactly `hyperparams`."""
    help: str
    """One line: the formula and the paper."""
    uses_reference: bool
    """Needs reference log-probs (the trainer holds a reference model, or precomputes them)."""
    length_averaged: bool
    """Wants per-token mean log-probs (policy and reference) instead of summed ones."""
    hyperparams: tuple[HyperParam, ...]

    def hyperparam(self, name: str) -> HyperParam | None:
        return next((h for h in self.hyperparams if h.name == name), None)

    def declared(self, name: str) -> HyperParam:
        """Hyperparameter ``name`` of a variant that declares it (one of `owners`); KeyError otherwise."""
        h = self.hyperparam(name)
        if h is None:
            raise KeyError(f"DPO loss_type {self.name!r} has no hyperparameter {name!r}")
        return h


# ---------------------------------------------------------------- the per-pair functions
def _sigmoid(p: PairLogps, *, beta: float, label_smoothing: float) -> PairLoss:
    """DPO, Rafailov et al. 2023, "Direct Preference Optimization"; with ``eps > 0`` it is
    conservative DPO (cDPO, Mitchell 2023, "A note on DPO with noisy preferences"): the label is
    taken to be flipped with probability eps, giving the cross-entropy against soft labels::

        -(1 - eps) * log sigmoid(beta h) - eps * log sigmoid(-beta h)
    """
    chosen, rejected = p.log_ratios()
    h, eps = chosen - rejected, label_smoothing
    losses = -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    return PairLoss(losses, beta * chosen, beta * rejected)


def _robust(p: PairLogps, *, beta: float, label_smoothing: float) -> PairLoss:
    """Robust DPO, Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with
    Noisy Feedback"; an unbiased estimate of the clean-label loss when labels flip with
    probability eps < 0.5 (hence the division by ``1 - 2 eps``)::

        (-(1 - eps) * log sigmoid(beta h) + eps * log sigmoid(-beta h)) / (1 - 2 eps)
    """
    chosen, rejected = p.log_ratios()
    h, eps = chosen - rejected, label_smoothing
    unnormalised = -(1.0 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)
    return PairLoss(unnormalised / (1.0 - 2.0 * eps), beta * chosen, beta * rejected)


def _hinge(p: PairLogps, *, beta: float) -> PairLoss:
    """SLiC hinge loss, Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human
    Feedback", on the DPO logit::

        relu(1 - beta h)
    """
    chosen, rejected = p.log_ratios()
    return PairLoss(torch.relu(1.0 - beta * (chosen - rejected)), beta * chosen, beta * rejected)


def _ipo(p: PairLogps, *, beta: float) -> PairLoss:
    """IPO, Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences": regress h onto a fixed target instead of pushing it to infinity::

        (h - 1 / (2 beta))^2

    The paper's h is built from *length-averaged* log-probs (per-token means), hence the entry's
    ``length_averaged``; with summed log-probs the target would mean something else for every length.
    """
    chosen, rejected = p.log_ratios()
    return PairLoss((chosen - rejected - 1.0 / (2.0 * beta)) ** 2, beta * chosen, beta * rejected)


def _reference_free(p: PairLogps, *, beta: float) -> PairLoss:
    """DPO with the reference dropped (h = logp_c - logp_r); with beta = 1 it is the plain
    pairwise likelihood loss ``-log sigmoid(logp(x+) - logp(x-))``::

        -log sigmoid(beta h)
    """
    return PairLoss(-F.logsigmoid(beta * (p.chosen - p.rejected)), beta * p.chosen, beta * p.rejected)


def _simpo(p: PairLogps, *, beta: float, simpo_gamma: float) -> PairLoss:
    """SimPO, Meng, Xia, Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward": the reward is the length-normalised log-prob ``beta/|y| logp(y) = beta * avg logp`` and
    the chosen one must beat the rejected one by a target margin gamma::

        -log sigmoid(beta avg_logp_c - beta avg_logp_r - gamma)

    ``p`` holds the per-token means (the entry is ``length_averaged``).
    """
    chosen, rejected = beta * p.chosen, beta * p.rejected
    return PairLoss(-F.logsigmoid(chosen - rejected - simpo_gamma), chosen, rejected)


def _log_odds(avg_logp: Tensor) -> Tensor:
    """``log(q / (1 - q))`` of the per-token mean probability ``q = exp(avg_logp)``, ``(B,)``.

    ``log(1 - q) = log(-expm1(avg_logp))`` keeps precision near q = 1. A float32 log-softmax rounds
    a near-certain token to exactly 0, so avg_logp may be 0, where the odds are infinite: it is
    clamped to just below 0 (finite, and a no-op for every avg_logp that is not 0).
    """
    x = avg_logp.clamp(max=-torch.finfo(avg_logp.dtype).tiny)
    return x - torch.log(-torch.expm1(x))


def _orpo(p: PairLogps, *, orpo_lambda: float) -> PairLoss:
    """ORPO, Hong, Lee, Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model": supervised fine-tuning on the chosen completion plus an odds-ratio penalty, both on
    per-token mean log-probs (the entry is ``length_averaged``)::

        -avg_logp_c - lambda * log sigmoid(log odds_c - log odds_r),  odds = q / (1 - q), q = exp(avg_logp)

    Rewards are the mean log-probs themselves (no beta: ORPO has none); log odds rise with them, so
    ``rewards/accuracies`` is also the fraction of pairs with a positive log-odds ratio.
    """
    nll = -p.chosen
    log_odds_ratio = _log_odds(p.chosen) - _log_odds(p.rejected)
    losses = nll - orpo_lambda * F.logsigmoid(log_odds_ratio)
    extra = {"orpo/nll": nll, "orpo/log_odds_ratio": log_odds_ratio}
    return PairLoss(losses, p.chosen, p.rejected, extra)


# ---------------------------------------------------------------- the table
def _beta(default: float, help: str) -> HyperParam:
    return HyperParam("beta", default, low=0.0, help=help)


_DPO_BETA = _beta(
    0.1, "inverse temperature of the implicit reward beta * log(pi / ref); larger stays closer to the reference"
)
_LABEL_SMOOTHING = HyperParam(
    "label_smoothing",
    0.0,
    low=0.0,
    low_closed=True,
    high=0.5,
    help="assumed probability that a pair's label is flipped (at 0.5 labels carry no information)",
)

# fmt: off
# A hand-laid table, one entry per variant (its prose wrapped inside); the formatter would put every argument
# on its own line and quadruple it.
DPO_LOSSES: dict[str, DPOVariant] = {v.name: v for v in (
    DPOVariant("sigmoid", _sigmoid, "DPO, Rafailov et al. 2023: -log sigmoid(beta h); label smoothing eps > 0 "
               "makes it conservative DPO (Mitchell 2023): -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)",
               uses_reference=True, length_averaged=False, hyperparams=(_DPO_BETA, _LABEL_SMOOTHING)),
    DPOVariant("ipo", _ipo, "IPO, Azar et al. 2023: (h - 1/(2 beta))^2, h from per-token mean log-probs",
               uses_reference=True, length_averaged=True,
               hyperparams=(_beta(0.1, "regularisation: the target logit is 1/(2 beta)"),)),
    DPOVariant("hinge", _hinge, "SLiC-HF hinge, Zhao et al. 2023: relu(1 - beta h)",
               uses_reference=True, length_averaged=False, hyperparams=(_DPO_BETA,)),
    DPOVariant("robust", _robust, "robust DPO, Chowdhury et al. 2024: (-(1-eps) log sigmoid(beta h) "
               "+ eps log sigmoid(-beta h)) / (1 - 2 eps), eps the label smoothing",
               uses_reference=True, length_averaged=False, hyperparams=(_DPO_BETA, _LABEL_SMOOTHING)),
    DPOVariant("reference_free", _reference_free, "DPO (Rafailov et al. 2023) without a reference: "
               "-log sigmoid(beta (logp_c - logp_r)); beta 1 is the pairwise likelihood loss",
               uses_reference=False, length_averaged=False,
               hyperparams=(_beta(1.0, "scale of the log-prob margin; 1 gives -log sigmoid(logp_c - logp_r)"),)),
    DPOVariant("simpo", _simpo, "SimPO, Meng, Xia, Chen 2024: -log sigmoid(beta avg_logp_c - beta avg_logp_r "
               "- gamma), avg_logp the per-token mean log-prob, no reference",
               uses_reference=False, length_averaged=True, hyperparams=(
                   _beta(2.0, "scale of the length-normalised reward beta * avg_logp"),
                   HyperParam("simpo_gamma", 1.0, low=0.0, low_closed=True,
                              help="target reward margin gamma between chosen and rejected (the paper's "
                                   "gamma / beta is about 0.5)"))),
    DPOVariant("orpo", _orpo, "ORPO, Hong, Lee, Thorne 2024: -avg_logp_c - lambda log sigmoid(log odds_c - "
               "log odds_r), odds = q / (1 - q) of the per-token mean probability q, no reference",
               uses_reference=False, length_averaged=True, hyperparams=(
                   HyperParam("orpo_lambda", 0.1, low=0.0,
                              help="weight lambda of the odds-ratio term against the chosen completion's NLL"),)),
)}
"""loss_type -> its `DPOVariant`."""
# fmt: on


def owners(name: str) -> list[DPOVariant]:
    """The variants that declare hyperparameter ``name``, in table order."""
    return [v for v in DPO_LOSSES.values() if v.hyperparam(name) is not None]


HYPERPARAM_NAMES: tuple[str, ...] = tuple(dict.fromkeys(h.name for v in DPO_LOSSES.values() for h in v.hyperparams))
"""Every hyperparameter name of the table, first-declared order."""


def resolve_hyperparams(
    variant: DPOVariant, given: Mapping[str, float | None], flag: Callable[[str], str] = str
) -> dict[str, float]:
    """The keyword arguments of ``variant.fn``: each hyperparameter it declares, ``given`` or its
    default, checked against its range.

    A value for a hyperparameter the variant does not declare would be silently ignored, so it is
    refused, unless it is None or the default it has wherever it is declared (label_smoothing 0, so
    a config's untouched fields pass). ``flag`` names a hyperparameter (and ``loss_type``) in messages:
    the keyword by default, the CLI flag for a config.
    """
    for name, value in given.items():
        users = owners(name)
        if not users:
            known = ", ".join(map(flag, HYPERPARAM_NAMES))
            raise ValueError(f"unknown DPO hyperparameter {flag(name)}; known: {known}")
        if value is None or variant.hyperparam(name) is not None:
            continue
        if {v.declared(name).default for v in users} != {value}:
            raise ValueError(
                f"{flag('loss_type')} {variant.name!r} does not use {flag(name)} (got {value}); "
                f"it applies to {sorted(v.name for v in users)}"
            )
    resolved = {}
    for h in variant.hyperparams:
        value = given.get(h.name)
        resolved[h.name] = h.default if value is None else value
        h.check(resolved[h.name], flag(h.name))
    return resolved


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    loss_type: str = "sigmoid",
    **hyperparams: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean DPO-family loss of a batch of pairs, and stats: `pair_loss_summary` of `dpo_pair_loss` (its arguments)."""
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    return pair_loss_summary(dpo_pair_loss(pc, pr, rc, rr, loss_type=loss_type, **hyperparams))


def dpo_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    loss_type: str = "sigmoid",
    **hyperparams: float | None,
) -> PairLoss:
    """A DPO-family loss of each preference pair, and the variant's rewards of its two completions.

    Args:
        policy_chosen_logps: ``(B,)`` log-prob of each chosen completion under the policy: summed
            over its tokens, or the per-token mean for a ``length_averaged`` variant (ipo, simpo,
            orpo; the caller averages, this function cannot tell).
        policy_rejected_logps: ``(B,)`` the same for the rejected completion.
        ref_chosen_logps: ``(B,)`` under the frozen reference model (detached here: it is a
            constant); None for a variant that takes no reference (reference_free, simpo, orpo), given
            for every other.
        ref_rejected_logps: ``(B,)`` likewise.
        loss_type: a key of `DPO_LOSSES`.
        **hyperparams: the variant's hyperparameters by name (``beta``, ``label_smoothing``,
            ``simpo_gamma``, ``orpo_lambda``); one left out or None takes the entry's default.

    Returns:
        A `PairLoss` of ``(B,)`` tensors: per-pair losses, the variant's rewards (``beta * (logp - ref)``; ``beta *
        logp`` for reference_free and simpo; the mean log-prob for orpo) and its own diagnostics.

    Raises:
        ValueError: unknown loss_type (the message lists the choices), a hyperparameter out of range or given to a
            variant that does not use it, reference log-probs missing (or given to a variant without a reference),
            or inputs not ``(B,)`` of one shape.
    """
    variant = DPO_LOSSES.get(loss_type)
    if variant is None:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {sorted(DPO_LOSSES)}")
    kwargs = resolve_hyperparams(variant, hyperparams)

    refs = (ref_chosen_logps, ref_rejected_logps)
    tensors = {"policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps}
    if not variant.uses_reference:
        if any(r is not None for r in refs):
            raise ValueError(f"loss_type {loss_type!r} takes no reference log-probs; pass None for both")
    elif ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"loss_type {loss_type!r} needs both ref_chosen_logps and ref_rejected_logps")
    else:
        tensors.update(ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    check_same_shape(**tensors)
    if policy_chosen_logps.dim() != 1:
        raise ValueError(f"dpo_loss expects (B,) log-probs, got shape {tuple(policy_chosen_logps.shape)}")

    return variant.fn(PairLogps(policy_chosen_logps, policy_rejected_logps, *refs), **kwargs)


def pair_loss_summary(out: PairLoss) -> tuple[Tensor, dict[str, Tensor]]:
    """``(loss, stats)`` of a batch: the 0-dim mean loss; stats, detached 0-dim batch means of the variant's rewards:
    ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (chosen - rejected), ``rewards/accuracies``
    (fraction with chosen > rejected strictly), plus the variant's own (orpo: ``orpo/nll``, ``orpo/log_odds_ratio``)."""
    loss = out.losses.mean()
    with torch.no_grad():
        chosen, rejected = out.chosen_rewards.detach(), out.rejected_rewards.detach()  # (B,)
        stats = {
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "rewards/accuracies": (chosen > rejected).to(out.losses.dtype).mean(),
            **{key: value.detach().mean() for key, value in out.extra.items()},
        }
    return loss, stats
