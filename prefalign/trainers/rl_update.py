"""The update half of `prefalign.trainers.rl.RLTrainer`: PPO's epoch and minibatch loop (`PPOUpdate.update`) with
a critic-free minibatch step.

Each minibatch's loss is `prefalign.losses.policy.aggregate_loss` of the per-token loss (clipped surrogate with
clip-higher, plus ``kl_coef * k3`` with --kl-in-loss, minus the entropy bonus) over the minibatch's rows on every
process: each micro-batch passes the minibatch's totals (kept tokens, kept rows, all processes), so the
accumulated gradient is the aggregate over the whole minibatch whichever rows the micro-batches and processes
hold (the same argument as PPO's token share; DDP's average over N processes is undone by a factor N).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from prefalign.losses.policy import aggregate_loss, clipped_policy_token_loss, kl_loss_term
from prefalign.trainers.guard import NonFiniteGuard
from prefalign.trainers.ppo_update import KLController, PPOUpdate

if TYPE_CHECKING:
    from prefalign.trainers.rl_config import RLConfig


class RLUpdate(PPOUpdate):
    """A mixin: the trainer's ``cfg`` (an `RLConfig`), ``trained_policy``, ``backend``, ``world``."""

    if TYPE_CHECKING:  # what it reads of `RLTrainer` beyond PPOUpdate's
        kl_ctl: KLController

        @property
        def cfg(self) -> RLConfig: ...

    def minibatch_step(self, rollout, mb_idx: torch.Tensor, mb_tokens: float, done: int) -> tuple[dict | None, dict]:
        """Accumulate the minibatch's micro-batches, then one guarded step: ``(stats, {"policy/grad_norm": ..})``,
        stats None when the step was skipped as non-finite or when no row of the minibatch is in the loss (every
        group dropped by --dynamic-sampling, or every row by --overlong-filter: no optimizer step). ``mb_tokens``
        (PPO's response tokens) is not used: the normalisers count the loss mask's tokens and rows."""
        cfg = self.cfg
        lengths = rollout.loss_lengths[:, mb_idx.cpu()]  # (N, mb rows) kept tokens of each row on every process
        totals = {"total_tokens": float(lengths.sum()), "total_rows": float((lengths > 0).sum())}
        if totals["total_rows"] == 0:  # the same on every process: all skip together
            return None, {}
        got = self.accumulate_minibatch(rollout, mb_idx, totals, self.micro_batch_backward)
        (norm,), finite = self.backend.step(self.trained, cfg.max_grad_norm, NonFiniteGuard.finite(got["loss/policy"]))
        self.record_step(finite, done)
        return (got if finite else None), {"policy/grad_norm": norm}

    def micro_batch_backward(
        self, rows: dict[str, torch.Tensor], prompt_width: int, totals: dict[str, float], sync: bool
    ) -> dict[str, float]:
        """One micro-batch's loss (``rows``: `GroupRollout.rows`), its part of the minibatch aggregate, backward;
        returns its parts of the losses and its token-share-weighted diagnostics."""
        cfg, acc = self.cfg, self.accelerator
        mask = rows["loss_mask"]  # (b, R)
        token_share = float(mask.sum()) * self.world / totals["total_tokens"]  # for the token-mean diagnostics
        fill = "fill_logps" in rows  # one step on-policy: this forward gives the rollout's log-probs (ratio 1)
        with_entropy = cfg.ent_coef > 0 or fill
        # backward inside the accumulate context: FSDP2 reads its no-sync flag during backward (DDP at forward)
        with self.backend.accumulate(self.trained, sync):
            with acc.autocast():
                new_logps, entropy = self.policy_train_forward(rows, with_entropy)
            new_logps = new_logps[:, prompt_width:].float()  # (b, R)
            old_logps = rows["logps"]
            if fill and entropy is not None:  # (filling asks for the entropy)
                old_logps = rows["fill_logps"][rows["index"]] = new_logps.detach()
                rows["fill_entropy"][rows["index"]] = entropy[:, prompt_width:].detach().float()
            pg_tokens, pg = clipped_policy_token_loss(
                new_logps, old_logps, rows["advantages"], mask, cfg.eps_low, cfg.eps_high
            )
            agg: dict[str, Any] = dict(max_len=cfg.max_new_tokens, **totals)
            pg_loss = aggregate_loss(pg_tokens, mask, cfg.aggregation, **agg)
            loss, parts = pg_loss, {"loss/policy": pg_loss}
            if cfg.kl_in_loss:
                kl_loss = aggregate_loss(kl_loss_term(new_logps, rows["ref_logps"], mask), mask, cfg.aggregation, **agg)
                loss, parts["loss/kl"] = loss + self.kl_ctl.coef * kl_loss, kl_loss
            if cfg.ent_coef > 0 and entropy is not None:  # (asked for)
                loss = loss - cfg.ent_coef * aggregate_loss(
                    entropy[:, prompt_width:].float(), mask, cfg.aggregation, **agg
                )
            # DDP averages gradients over the N processes; each holds a part of the sum, so scale by N
            self.backend.backward(self.trained_policy, loss * self.world, sync)
        stats = {k: float(v.detach()) * self.world for k, v in parts.items()}
        diag = (
            ("policy/approxkl", "approxkl"),
            ("policy/clipfrac", "clipfrac"),
            ("policy/clipfrac_low", "clipfrac_low"),
            ("policy/clipfrac_high", "clipfrac_high"),
            ("val/ratio", "ratio"),
        )
        # a micro-batch whose groups were all dropped has no token to average over: it adds nothing
        stats.update({name: float(pg[k]) * token_share if token_share else 0.0 for name, k in diag})
        return stats
