"""What each training method optimises, in words: one `Method` per command, read by the model card of every saved
model (`prefalign.trainers.card`) and by compare's report (`PPO_OBJECTIVE`).

A leaf: plain strings, no torch, so compare's arm table can read it without loading a model library. Methods with
variants take the variant's own line from its table: `prefalign.losses.dpo.DPO_LOSSES` (``--loss-type``) and
`prefalign.losses.advantages.ADVANTAGE_ESTIMATORS` (``--estimator``), through `Method.variant`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

PPO_OBJECTIVE = "E[min(r_t A_t, clip(r_t, 1-eps, 1+eps) A_t)]"
"""PPO's clipped surrogate objective (Schulman et al. 2017), maximised; r_t = pi(a_t | s_t) / pi_old(a_t | s_t)."""


@dataclass(frozen=True)
class Method:
    """How one kind of model is trained, as a model card states it."""

    name: str
    """Its usual name."""
    formula: str
    """The loss minimised, one line of plain text (a variant's line also names its paper)."""
    paper: str
    """Where the method comes from: authors, year, title."""
    tags: tuple[str, ...]
    """Hub tags besides ``prefalign``: lower-case, words joined by hyphens."""
    pipeline_tag: str = "text-generation"
    """The Hub task of the saved model: text-generation for a language model, text-classification for a model
    with a scalar head (reward and value models, loaded with ``AutoModelForSequenceClassification``)."""

    def variant(self, name: str, formula: str) -> Method:
        """This method as one variant of its table: ``name`` (a table key) joins the name and the tags, and
        ``formula`` replaces the method's."""
        return replace(self, name=f"{self.name}: {name}", formula=formula, tags=(*self.tags, name.replace("_", "-")))


METHODS: dict[str, Method] = {
    "sft": Method(
        "Supervised fine-tuning (SFT)",
        "-sum_{i,t} log pi(y_it | x_i, y_i,<t) / sum_i |y_i|: the mean negative log-likelihood of the completion "
        "tokens y (the prompt x is context only)",
        'the supervised step of Ouyang et al. 2022, "Training language models to follow instructions with human '
        'feedback"',
        ("sft",),
    ),
    "dpo": Method(
        "Direct Preference Optimization (DPO) family",
        "-log sigmoid(beta h)",
        'Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model"',
        ("dpo",),
    ),
    "reward": Method(
        "Reward model (Bradley-Terry)",
        "mean(-log sigmoid(r_c - r_r - margin)) + center_coef mean((r_c + r_r)^2), r the scalar head at the "
        "completion's last token",
        "Bradley & Terry 1952, as used for reward models by Christiano et al. 2017 and Ouyang et al. 2022; margin: "
        "Touvron et al. 2023 (Llama 2); centering: Eisenstein et al. 2023",
        ("reward-model", "bradley-terry"),
        pipeline_tag="text-classification",
    ),
    "ppo": Method(
        "PPO-RLHF",
        f"-{PPO_OBJECTIVE} + vf_coef * value loss - ent_coef * entropy, per response token, A_t by GAE (gamma, "
        "lam) on the critic over the per-token rewards -kl_coef KL_t plus the score on the last token",
        'Schulman et al. 2017, "Proximal Policy Optimization Algorithms"; Ziegler et al. 2019; Ouyang et al. '
        '2022; Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO"',
        ("ppo", "rlhf"),
    ),
    "value": Method(
        "PPO value model (critic)",
        "0.5 E[max((V_t - R_t)^2, (V_old + clip(V_t - V_old, -c, c) - R_t)^2)], R_t the GAE returns",
        "Schulman et al. 2017; value clipping from OpenAI Baselines' PPO2 (Dhariwal et al. 2017)",
        ("ppo", "rlhf", "value-model"),
        pipeline_tag="text-classification",
    ),
    "rl": Method(
        "Critic-free online RL",
        "-E[min(r_t A_t, clip(r_t, 1-eps_low, 1+eps_high) A_t)] aggregated by --loss-agg (+ kl_coef k3 per token "
        "with --kl-in-loss)",
        "clip-higher and dynamic sampling: Yu et al. 2025 (DAPO)",
        ("rlhf",),
    ),
}
"""Command (and ``value`` for PPO's critic) -> its `Method`."""
