"""The PPO update: ``ppo_epochs`` passes of clipped policy and value minibatch steps over one rollout.

Under ``accelerate launch`` each process updates on its own rows; each micro-batch's losses are weighted by its
share of the minibatch's tokens over all processes, so DDP's accumulated gradient average is the token mean over
the minibatch's rows, whichever rows the micro-batches and processes hold.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from prefalign.losses import masked_mean, ppo_policy_loss, ppo_value_loss
from prefalign.models.logprobs import completion_logprobs
from prefalign.models.value import token_values
from prefalign.rollout.generate import key_seed
from prefalign.rollout.rollout import Rollout
from prefalign.trainers.dist import mean_across_processes
from prefalign.trainers.guard import NonFiniteGuard
from prefalign.trainers.metrics import RunningMean

if TYPE_CHECKING:
    from accelerate import Accelerator

    from prefalign.trainers.backend import AccelerateBackend, Trained
    from prefalign.trainers.ppo_config import PPOConfig


class KLController:
    """Fixed or adaptive KL coefficient (Ziegler et al. 2019, section 2.2).

    Adaptive: ``e = clip(KL / target - 1, -0.2, 0.2)``, ``coef *= 1 + e * n / horizon`` after each batch of
    ``n`` episodes, so the coefficient rises when the policy drifts past the target and falls below it.
    """

    def __init__(self, coef: float, adaptive: bool, target: float, horizon: int):
        self.coef, self.adaptive, self.target, self.horizon = coef, adaptive, target, horizon

    def update(self, kl: float, n_episodes: int) -> None:
        if self.adaptive:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.coef *= 1.0 + error * n_episodes / self.horizon

    def state_dict(self) -> dict:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict) -> None:
        self.coef = float(state["coef"])


class PPOUpdate:
    """The update half of `prefalign.trainers.ppo.PPOTrainer` (a mixin: it reads the trainer's models)."""

    if TYPE_CHECKING:  # what it reads of the trainer (`Run`, `PPOTrainer`)
        accelerator: Accelerator
        backend: AccelerateBackend
        world: int
        trained: list[Trained]
        trained_policy: Trained
        trained_value: Trained

        @property
        def cfg(self) -> PPOConfig: ...

        def record_step(self, finite: bool, done: int) -> None: ...

    def update(self, rollout: Rollout, done: int) -> dict[str, float]:
        """``ppo_epochs`` passes of minibatch updates over this process's rows; one optimizer step per minibatch.

        Returns this process's stats, each micro-batch's token mean weighted by its share of the minibatch's
        tokens (x processes) and summed, so their plain average over processes is the token mean over all rows.
        """
        cfg, acc = self.cfg, self.accelerator
        stats = RunningMean()
        self.minibatch_stats: list[dict[str, float]] = []
        for t in self.trained:
            t.engine.train()
        rows = rollout.response_mask.shape[0]  # this process's rows: rollout_batch_size / processes
        mb_rows = rows // cfg.num_minibatches  # its rows in each minibatch
        # (N, rows): response lengths of every process, to count a minibatch's tokens everywhere
        lengths = acc.gather(rollout.response_mask.sum(1)).view(self.world, rows)
        for epoch in range(cfg.ppo_epochs):
            # a pure function of (seed, iteration, epoch), the same on every process: minibatch i of process r
            # holds r's local rows perm[i], so lengths[:, perm[i]] counts the minibatch's tokens everywhere
            perm = torch.randperm(rows, generator=torch.Generator().manual_seed(key_seed(cfg.seed, done, epoch)))
            epoch_kl = RunningMean()
            for mb in range(cfg.num_minibatches):
                mb_idx = perm[mb * mb_rows : (mb + 1) * mb_rows]
                got, norms = self.minibatch_step(rollout, mb_idx, float(lengths[:, mb_idx].sum()), done)
                if got is not None:
                    self.minibatch_stats.append(got)
                    stats.add({**got, **norms})
                    epoch_kl.add({"approxkl": got["policy/approxkl"]})
            if cfg.early_stop_kl is not None and epoch + 1 < cfg.ppo_epochs:  # after the last epoch: nothing to stop
                epoch_approxkl = mean_across_processes(acc, epoch_kl.pop()).get("approxkl", 0.0)
                if epoch_approxkl > cfg.early_stop_kl:  # the same value on every process: all stop together
                    stats.add({"policy/early_stopped": 1.0})
                    break
        return stats.pop()

    def minibatch_step(
        self, rollout: Rollout, mb_idx: torch.Tensor, mb_tokens: float, done: int
    ) -> tuple[dict | None, dict]:
        """The policy's micro-batches and its guarded step, then the value model's: ``(stats, pre-clip gradient
        norms)``, stats None when either step was skipped as non-finite.

        The models share no parameter, so each gets the gradient of ``pg_loss + vf_coef * vf_loss``; stepping the
        policy before the value model's first forward frees its gradients (0.5 GB for the default in float32)
        before the value model's backward, where PPO's update peaked. Each step is guarded by its own loss and
        gradient norm (a non-finite value loss leaves the policy's finite step applied); the step counts as
        skipped (`record_step`) when either was."""
        cfg = self.cfg
        got = self.accumulate_minibatch(rollout, mb_idx, mb_tokens, self.policy_backward)
        (norm_p,), policy_ok = self.backend.step(
            [self.trained_policy], cfg.max_grad_norm, NonFiniteGuard.finite(got["loss/policy"])
        )
        got |= self.accumulate_minibatch(rollout, mb_idx, mb_tokens, self.value_backward)
        (norm_v,), value_ok = self.backend.step(
            [self.trained_value], cfg.max_grad_norm, NonFiniteGuard.finite(got["loss/value"])
        )
        finite = policy_ok and value_ok
        self.record_step(finite, done)
        return (got if finite else None), {"policy/grad_norm": norm_p, "val/grad_norm": norm_v}

    def accumulate_minibatch(
        self, rollout: Rollout, mb_idx: torch.Tensor, norm, backward: Callable[..., dict[str, float]]
    ) -> dict[str, float]:
        """Forward and backward of the minibatch's ``grad_accum`` micro-batches (gradients synced on the last),
        each by ``backward(rows, prompt_width, norm, sync)``; returns the sums of their stats. ``norm``: what
        every micro-batch divides by (the minibatch's tokens for PPO; its totals for the critic-free family)."""
        micro_rows = len(mb_idx) // self.cfg.grad_accum
        mb_stats: dict[str, float] = defaultdict(float)  # share-weighted sums over the micro-batches
        for micro in range(self.cfg.grad_accum):
            rows = rollout.rows(mb_idx[micro * micro_rows : (micro + 1) * micro_rows])
            sync = micro == self.cfg.grad_accum - 1
            for k, v in backward(rows, rollout.prompt_width, norm, sync).items():
                mb_stats[k] += v
        return dict(mb_stats)

    def policy_train_forward(self, rows: dict[str, torch.Tensor], with_entropy: bool):
        """``(logps, entropy or None)``, each ``(b, P+R)``: the policy's forward with gradients on a micro-batch's
        ``rows``, at the sampling temperature (call it inside the backend's accumulate and autocast contexts)."""
        out = self.trained_policy.forward(
            completion_logprobs,
            rows["query_response"],
            rows["attention_mask"],
            rows["completion_mask"],
            temperature=self.cfg.temperature,
            return_entropy=with_entropy,
        )
        return out if with_entropy else (out, None)

    def token_share(self, rows: dict[str, torch.Tensor], mb_tokens: float) -> float:
        """A micro-batch's weight: N x its share of the minibatch's response tokens. DDP averages gradients over
        processes; weighting each micro-batch's token mean by this makes the accumulated average the token mean
        over the whole minibatch (a plain 1 / grad_accum would weigh a short micro-batch's tokens more, and 2
        processes split rows unlike 1)."""
        return float(rows["response_mask"].sum()) * self.world / mb_tokens

    def policy_backward(
        self, rows: dict[str, torch.Tensor], prompt_width: int, mb_tokens: float, sync: bool
    ) -> dict[str, float]:
        """The clipped policy loss (minus ``ent_coef`` x entropy) of one micro-batch (``rows``: `Rollout.rows`),
        backward scaled by its token share; returns its share-weighted stats. Backward inside the accumulate
        context: FSDP2 reads its no-sync flag during backward (DDP at forward)."""
        cfg, acc = self.cfg, self.accelerator
        mask, token_share = rows["response_mask"], self.token_share(rows, mb_tokens)
        with self.backend.accumulate([self.trained_policy], sync):
            with acc.autocast():
                new_logps, entropy = self.policy_train_forward(rows, with_entropy=cfg.ent_coef > 0)
            pg_loss, pg = ppo_policy_loss(
                new_logps[:, prompt_width:].float(), rows["logps"], rows["advantages"], mask, cfg.clip_eps
            )
            policy_loss = pg_loss
            if entropy is not None:
                policy_loss = policy_loss - cfg.ent_coef * masked_mean(entropy[:, prompt_width:].float(), mask)
            self.backend.backward(self.trained_policy, policy_loss * token_share, sync)
        return {
            k: float(v) * token_share
            for k, v in (
                ("loss/policy", pg_loss.detach()),
                ("policy/approxkl", pg["approxkl"]),
                ("policy/clipfrac", pg["clipfrac"]),
                ("val/ratio", pg["ratio"]),
            )
        }

    def value_backward(
        self, rows: dict[str, torch.Tensor], prompt_width: int, mb_tokens: float, sync: bool
    ) -> dict[str, float]:
        """``vf_coef`` x the clipped value loss of one micro-batch, backward scaled by its token share; returns its
        share-weighted stats."""
        cfg, acc = self.cfg, self.accelerator
        mask, token_share = rows["response_mask"], self.token_share(rows, mb_tokens)
        with self.backend.accumulate([self.trained_value], sync):
            with acc.autocast():
                new_values = self.trained_value.forward(
                    token_values, rows["query_response"], rows["attention_mask"], rows["completion_mask"]
                )
            vf_loss, vf = ppo_value_loss(
                new_values[:, prompt_width:].float(), rows["values"], rows["returns"], mask, cfg.vf_clip
            )
            self.backend.backward(self.trained_value, cfg.vf_coef * vf_loss * token_share, sync)
        return {
            "loss/value": float(vf_loss.detach()) * token_share,
            "val/clipfrac": float(vf["vf_clipfrac"]) * token_share,
        }
