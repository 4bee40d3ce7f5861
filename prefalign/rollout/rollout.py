"""The rollout batch PPO learns from."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(kw_only=True)  # built by keyword: several fields are (B, R) float tensors a positional slip would swap
class Rollout:
    """B sampled responses and everything the PPO update needs about them.

    P = prompt width (left-padded), R = response width (right-padded); the response of every row
    starts at column P of ``query_response``.
    """

    # -- tokens and masks --
    query_response: torch.Tensor  # (B, P+R) prompt then response token ids
    attention_mask: torch.Tensor  # (B, P+R) 1 on real tokens
    completion_mask: torch.Tensor  # (B, P+R) 1 on real response tokens
    response_mask: torch.Tensor  # (B, R) 1 on real response tokens (EOS included)
    ended: torch.Tensor  # (B,) bool: the response ended (EOS / stop string) before the token limit
    # -- from the models at sampling time (no grad) --
    logps: torch.Tensor  # (B, R) policy log-probs of the sampled tokens (at the sampling temperature)
    ref_logps: torch.Tensor  # (B, R) reference log-probs of the same tokens
    values: torch.Tensor  # (B, R) value of the state before each response token
    entropy: torch.Tensor  # (B, R) policy entropy at each response position
    # -- rewards and advantages --
    scores: torch.Tensor  # (B,) reward-source score (after clip and missing-EOS penalty)
    kl: torch.Tensor  # (B, R) per-token KL estimate
    non_score_rewards: torch.Tensor  # (B, R) -kl_coef * kl
    # (B, R) per-token rewards: KL penalty, score on the last real token (whitened with --whiten-rewards)
    rewards: torch.Tensor
    advantages: torch.Tensor  # (B, R) GAE advantages, whitened over the batch
    returns: torch.Tensor  # (B, R) advantages (before whitening) + values: the value targets
    # -- text --
    prompts: list[str]
    completions: list[str]

    @classmethod
    def of_samples(cls, gen, sequences: tuple[torch.Tensor, ...], shaped: tuple[torch.Tensor, ...], **fields):
        """The rollout of the sampled batch ``gen`` (`prefalign.rollout.generate.Generation`: its response mask and
        ``ended``) with ``sequences`` = its ``gen.sequences()`` (query_response, attention_mask, completion_mask)
        and ``shaped`` = (rewards, kl, non_score_rewards) of `kl_shaped_rewards`; ``fields``: the model outputs,
        scores, advantages, text and a subclass's own fields, by keyword. The one place both the PPO and the
        critic-free rollouts are assembled."""
        query_response, attention_mask, completion_mask = sequences
        rewards, kl, non_score_rewards = shaped
        return cls(
            query_response=query_response,
            attention_mask=attention_mask,
            completion_mask=completion_mask,
            response_mask=gen.response_mask,
            ended=gen.ended,
            rewards=rewards,
            kl=kl,
            non_score_rewards=non_score_rewards,
            **fields,
        )

    @property
    def prompt_width(self) -> int:
        return self.query_response.shape[1] - self.response_mask.shape[1]

    def rows(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors the update needs for rows ``idx``."""
        return {
            k: getattr(self, k)[idx]
            for k in (
                "query_response",
                "attention_mask",
                "completion_mask",
                "response_mask",
                "logps",
                "values",
                "advantages",
                "returns",
            )
        }
