"""The critic-free online family on PPO's skeleton: GRPO, Dr. GRPO, RLOO, REINFORCE++, with DAPO's options.

`RLTrainer` is a `PPOTrainer` without a value model: it reuses PPO's setup (tokenizer, prompts, policy,
reference, LoRA), prompt order and sharding, sampling copy, KL controller, checkpoints and samples, and its
epoch/minibatch loop (`PPOUpdate.update`). What differs is here and in `prefalign.trainers.rl_update`:

- each prompt is sampled ``K = --num-generations`` times; completion ``k`` of prompt ``i`` at iteration ``s``
  draws from the stream ``key_seed(s, i, k)``, so it does not depend on the batch layout or the process count;
  a process holds whole groups (its share of prompts, each with its K rows, consecutive);
- advantages come from the table `prefalign.losses.advantages.ADVANTAGE_ESTIMATORS` by ``--estimator``;
- the policy loss has clip-higher, a choice of aggregation and optionally the KL as a loss term
  (`prefalign.losses.policy`); ``--dynamic-sampling`` takes groups of equal scores out of the loss;
  ``--overlong-buffer`` lowers the scores of completions near the length limit (DAPO's soft overlong punishment,
  `prefalign.losses.overlong_penalty`) after dynamic sampling judged the groups and before the advantages,
  ``--overlong-filter`` takes truncated completions out of the loss (DAPO's overlong filtering);
- several reward sources, weighted and summed (`prefalign.reward_mix.WeightedRewards`), each logged.

PPO's own code paths are untouched: `prefalign ppo` gives the same numbers as before this module existed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prefalign.collectives import process_max
from prefalign.losses import ADVANTAGE_ESTIMATORS, AdvantageInputs, kl_shaped_rewards, overlong_penalty
from prefalign.losses.policy import informative_groups
from prefalign.methods import METHODS, Method
from prefalign.rollout.generate import key_seed
from prefalign.rollout.rollout import Rollout
from prefalign.trainers.dist import masked_mean_var, mean_across_processes, sum_across_processes
from prefalign.trainers.final import save_final_model
from prefalign.trainers.optim import make_optimizer
from prefalign.trainers.ppo import PPOTrainer
from prefalign.trainers.refill import Groups, refill
from prefalign.trainers.rl_config import RLConfig
from prefalign.trainers.rl_update import RLUpdate

__all__ = ["GroupRollout", "RLConfig", "RLTrainer"]


@dataclass(kw_only=True)
class GroupRollout(Rollout):
    """A `Rollout` of B = prompts x K rows, K consecutive rows per prompt. ``values`` are zeros (no critic);
    ``returns`` are the estimator's (R_i on every token for outcome estimators, the return-to-go for
    reinforce_pp), logged only."""

    loss_mask: torch.Tensor  # (B, R) response_mask with the rows of dropped groups (and filtered ones) zeroed
    kept: torch.Tensor  # (B,) bool: the row's group is in the loss (all True without --dynamic-sampling)
    loss_lengths: torch.Tensor  # (N, B) tokens of loss_mask per row of every process (the normalisers)
    # the rollout skipped the policy's forward (`RLTrainer.one_step_on_policy`): ``logps`` and ``entropy`` are
    # placeholders until the update's forward writes them (`RLUpdate.micro_batch_backward`)
    policy_pending: bool = False
    score_parts: dict[str, torch.Tensor] = field(default_factory=dict)  # source -> (B,) unweighted scores
    refill: dict[str, float] = field(default_factory=dict)  # this process's refill stats (--resample-rounds)

    def rows(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``idx`` of the update's tensors, ``index`` (b,) = idx; with ``policy_pending`` also the whole
        (B, R) ``fill_logps`` / ``fill_entropy`` (this rollout's own tensors, written at ``index``)."""
        fill = {"fill_logps": self.logps, "fill_entropy": self.entropy} if self.policy_pending else {}
        return {
            "index": idx,
            **fill,
            **{
                k: getattr(self, k)[idx]
                for k in (
                    "query_response",
                    "attention_mask",
                    "completion_mask",
                    "loss_mask",
                    "logps",
                    "ref_logps",
                    "advantages",
                )
            },
        }


class RLTrainer(RLUpdate, PPOTrainer):
    command = "rl"

    def __init__(self, cfg: RLConfig, reward_source=None):
        """``reward_source``: an object with ``score(prompts, completions) -> (B,)`` (logged under its ``name``);
        default: ``cfg.reward`` weighted by ``cfg.reward_weights``."""
        super().__init__(cfg, reward_source)
        self.estimator = ADVANTAGE_ESTIMATORS[cfg.estimator]

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        """PPO's setup (tokenizer, prompts, policy, reference) with every reward source, and no value model."""
        from prefalign.reward_mix import WeightedRewards

        cfg = self.cfg
        if self.reward_source is None:
            self.reward_source = WeightedRewards.load(
                cfg.reward,
                cfg.weights,
                batch_size=cfg.reward_batch_size,
                device=str(self.accelerator.device),
                autocast_dtype=self.frozen_dtype,
            )
        elif not isinstance(self.reward_source, WeightedRewards):
            self.reward_source = WeightedRewards(
                {getattr(self.reward_source, "name", "reward"): self.reward_source}, [1.0]
            )
        super().setup()

    def load_value(self):
        return None  # critic-free: the baseline comes from the group or the batch

    def build(self) -> None:
        """The policy's optimizer and backend; the sampling copy, KL controller and sampling as PPO's."""
        cfg = self.cfg
        self.total_steps = cfg.total_steps
        updates = self.total_steps * cfg.ppo_epochs * cfg.num_minibatches  # optimizer steps over the run
        opt, sched = make_optimizer(self.policy, cfg, cfg.learning_rate, updates)
        self.trained_policy = self.backend.prepare("policy", self.policy, opt, sched)
        self.trained = [self.trained_policy]
        self.build_sampling()

    def run_info(self) -> dict:
        cfg = self.cfg
        return {
            "prompts": len(self.prompts),
            "data": self.data_info,
            "total_iterations": self.total_steps,
            "estimator": cfg.estimator,
            "num_generations": cfg.num_generations,
            "loss_aggregation": cfg.aggregation,
            "episodes": self.total_steps * cfg.completions_per_iteration,
            "reward": self.reward_source.name,
            "frozen_dtype": self.frozen_dtype_name,
            "activations": self.activations,
            "policy_trainable_parameters": sum(p.numel() for p in self.policy.parameters() if p.requires_grad),
            **self.heldout_info(),
        }

    def save_final(self, out: Path) -> None:
        """``final/``: the policy (adapter with LoRA, plus ``final-merged/`` with --merge-lora) with its model card;
        no critic."""
        save_final_model(
            self.backend,
            out / "final",
            self.trained_policy,
            self.tokenizer,
            merged=self.cfg.merge_lora,
            card=self.card(),
        )

    def resume_shape(self) -> dict[str, int]:
        """PPO's, and K: a completion's key holds its index in the group."""
        return super().resume_shape() | {"--num-generations": self.cfg.num_generations}

    def card_method(self) -> Method:
        """The critic-free loss with the --estimator's line of `ADVANTAGE_ESTIMATORS` (its formula and paper)."""
        rl = METHODS["rl"]
        return rl.variant(self.estimator.name, f"{rl.formula}; A_t: {self.estimator.help}")

    # ---------------------------------------------------------------- rollout
    @torch.no_grad()
    def rollout(self, idx: list[int], step: int, timing: dict) -> GroupRollout:
        """This process's rollout of iteration ``step``: K completions of each prompt of ``idx`` (its shard). A
        collective: reinforce_pp's whitening and the loss normalisers use every process's rows."""
        cfg, acc = self.cfg, self.accelerator
        k, dev = cfg.num_generations, acc.device
        # 1. sample K responses per prompt, consecutive rows, each keyed by (iteration, prompt, k); 2. score them
        #    with every reward source, weighted and summed, clipped, missing EOS penalised; 3. --resample-rounds:
        #    groups of equal scores replaced by new ones (DAPO); 3b. --overlong-buffer's penalty added after, so
        #    dynamic sampling judges a group by its rewards, not by its lengths (DAPO filters on correctness)
        groups, refill_stats = self.sample_groups(idx, step, timing)
        gen, prompts, texts, scores = groups.gen, groups.prompts, groups.texts, groups.scores
        if cfg.overlong_buffer is not None:
            scores = scores + self.overlong_penalties(gen.response_mask).to(scores.dtype)
        # 4. masks: the response of every row starts at column P
        seqs = gen.sequences()  # (query_response, attention_mask, completion_mask)
        response_mask = gen.response_mask  # (B, R)
        # 5. old and reference log-probs (at the sampling temperature), entropy
        logps, entropy, ref_logps = self.rollout_logprobs(gen, seqs, timing)
        # 6. per-token rewards: the KL penalty (unless it is a loss term) on every token, the score on the last
        kl_coef = 0.0 if cfg.kl_in_loss else self.kl_ctl.coef
        rewards, kl, non_score = kl_shaped_rewards(scores, logps, ref_logps, response_mask, kl_coef, cfg.kl_estimator)
        # 7. groups still of equal scores out of the loss, and with --overlong-filter truncated completions (DAPO;
        #    such a completion still counts in its group's baseline); 8. advantages by the estimator's table entry
        kept = informative_groups(groups.scores, k) if cfg.dynamic_sampling else torch.ones_like(gen.ended, device=dev)
        loss_mask = response_mask * kept[:, None].to(response_mask.dtype)
        if cfg.overlong_filter:
            loss_mask = loss_mask * gen.ended[:, None].to(loss_mask)
        advantages, returns = self.estimator.fn(
            AdvantageInputs(
                rewards,
                response_mask,
                k,
                gamma=cfg.gamma,
                batch_stats=lambda x, m: masked_mean_var(acc, x, self.whitened_over(m, loss_mask)),
                scores=scores,
            )
        )
        loss_lengths = acc.gather(loss_mask.sum(1)).view(self.world, -1).cpu()
        return GroupRollout.of_samples(
            gen,
            seqs,
            (rewards, kl, non_score),
            logps=logps,
            ref_logps=ref_logps,
            values=torch.zeros_like(logps),
            entropy=entropy,
            scores=scores,
            advantages=advantages,
            returns=returns,
            prompts=prompts,
            completions=texts,
            loss_mask=loss_mask,
            kept=kept.bool(),
            loss_lengths=loss_lengths,
            policy_pending=self.one_step_on_policy,
            score_parts=groups.parts,
            refill=refill_stats,
        )

    def whitened_over(self, mask: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """The tokens a batch-whitening estimator (reinforce_pp) takes its mean and variance over: those in the loss,
        so the advantages it trains on are mean 0, variance 1 (DAPO drops its groups before the advantages, as
        verl's recipe filters them first; --overlong-filter's truncated completions are out too). Every process's
        count decides, so all take the same mask; with fewer than 2 kept tokens in the batch (too few for a
        variance) the whole ``mask`` is used."""
        if not (self.cfg.dynamic_sampling or self.cfg.overlong_filter):
            return mask
        kept = int(sum_across_processes(self.accelerator, loss_mask.sum().double()).item())
        return loss_mask if kept >= 2 else mask

    def sample_groups(self, idx: list[int], step: int, timing: dict) -> tuple[Groups, dict[str, float]]:
        """The scored K completions of every prompt of ``idx`` (this process's shard) and, with --dynamic-sampling
        and --resample-rounds, the refill of its groups of equal scores (`prefalign.trainers.refill`) with its
        stats. Rounds add to ``timing``'s generation and scoring times. A collective with --resample-rounds."""
        cfg, acc = self.cfg, self.accelerator
        first = self.sample_round(idx, step, 0, timing)
        if not (cfg.dynamic_sampling and cfg.resample_rounds):
            return first, {}
        offset, n = acc.process_index * len(idx), len(self.prompts)  # this process's first slot of the batch

        def sample(r: int, slots: list[int]) -> Groups:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(key_seed(cfg.seed, step, r)))
            times: dict[str, float] = {}
            groups = self.sample_round([int(order[(offset + g) % n]) for g in slots], step, r, times)
            for key, seconds in times.items():
                timing[key] += seconds
            return groups

        def anyone_missing(count: int) -> bool:
            return process_max(count, acc.device) > 0

        k, pad = cfg.num_generations, self.tokenizer.pad_token_id
        return refill(first, k, cfg.resample_rounds, sample, anyone_missing, pad, keep_busy=self.backend.sharded)

    def sample_round(self, idx: list[int], step: int, r: int, timing: dict) -> Groups:
        """K scored completions of each prompt of ``idx``, completion ``j`` of prompt ``i`` keyed by ``(step, i,
        j)`` in round 0 and ``(step, i, j, r)`` in refill round ``r`` (without --overlong-buffer's penalty, which
        the rollout adds after the equal-score checks). Records generation and scoring times."""
        k = self.cfg.num_generations
        rows = [i for i in idx for _ in range(k)]
        keys = [key_seed(step, i, j, *((r,) if r else ())) for i in idx for j in range(k)]
        gen = self.sample([self.prompt_ids[i] for i in rows], keys, timing)[0]
        prompts, texts, scores = self.score_completions(rows, gen, timing, "--reward")
        parts = {name: part.to(self.accelerator.device) for name, part in self.reward_source.last_parts.items()}
        return Groups(gen, rows, prompts, texts, scores, parts)

    def overlong_penalties(self, response_mask: torch.Tensor) -> torch.Tensor:
        """``(B,)`` DAPO's soft overlong punishment of each completion of a ``(B, R)`` ``response_mask``: L_max is
        --max-new-tokens (no completion is longer), L_cache --overlong-buffer, |y| the completion's tokens (the EOS
        or stopping token included, as verl counts them). Needs --overlong-buffer."""
        cfg = self.cfg
        assert cfg.overlong_buffer is not None, "called only with --overlong-buffer"
        lengths = response_mask.sum(1)
        return overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_factor)

    def rollout_logprobs(self, gen, seqs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], timing: dict):
        """``(logps, entropy, ref_logps)`` of the responses of ``gen`` (its ``sequences()`` ``seqs``), each
        ``(B, R)``: the rollout's old and reference log-probs (at the sampling temperature) and entropy. One step
        on-policy: the reference's only, and placeholders for the policy's that the update's own forward fills in
        (RLUpdate). Records ``time/logprobs``."""
        t0 = time.perf_counter()
        skip = self.one_step_on_policy
        logps, entropy, ref_logps, _ = self.response_forwards(
            seqs, gen.prompt_ids.shape[1], gen.recorded, policy=not skip
        )
        if skip:
            logps, entropy = ref_logps.clone(), torch.zeros_like(ref_logps)
        timing["time/logprobs"] = time.perf_counter() - t0
        return logps, entropy, ref_logps

    @property
    def old_logprobs_from_decode(self) -> bool:
        """As PPO's, except one step on-policy, where the update's own forward gives them exactly."""
        return super().old_logprobs_from_decode and not self.one_step_on_policy

    @property
    def one_step_on_policy(self) -> bool:
        """One optimizer step per rollout (one epoch, one minibatch) with the KL as a loss term: the update's own
        forward is the policy that sampled (ratio 1) and nothing before it needs the policy's log-probs, so the
        rollout skips that forward (as TRL's GRPO does with num_iterations=1)."""
        cfg = self.cfg
        return cfg.ppo_epochs == 1 and cfg.num_minibatches == 1 and cfg.kl_in_loss

    # ---------------------------------------------------------------- metrics
    def iteration_metrics(  # type: ignore[override]  # an RLTrainer's rollouts are GroupRollouts
        self, rollout: GroupRollout, update_stats: dict, timing: dict, done: int
    ) -> dict:
        """The iteration's metrics over every process (a collective); every process holds as many rows."""
        cfg, acc, mask = self.cfg, self.accelerator, rollout.response_mask
        if rollout.policy_pending:
            self.fill_on_policy(rollout)
        k = cfg.num_generations
        groups = rollout.scores.view(-1, k)  # (b / K, K)
        means = mean_across_processes(
            acc,
            {
                **self.rollout_means(rollout),
                **{f"objective/scores/{n}": p.mean().item() for n, p in rollout.score_parts.items()},
                "rl/group_score_std": groups.std(1).mean().item() if k > 1 else 0.0,
                "rl/groups_dropped": float((~rollout.kept).sum()) / k,
                **self.overlong_means(rollout),
                # a sum: over tokens, divided below by every process's tokens (processes hold unequal token counts)
                "advantage_abs_sum": (rollout.advantages.abs() * mask).sum().item(),
                **rollout.refill,
                **update_stats,
                **timing,
            },
        )
        out = {
            key: v
            for key, v in means.items()
            if key not in ("num_eos", "tokens", "rl/groups_dropped", "advantage_abs_sum") and "refill/" not in key
        }
        dropped = round(means["rl/groups_dropped"] * self.world)
        if rollout.refill:  # totals over processes; the rounds are the same on every process
            out["rl/groups_refilled"] = round(means["refill/groups"] * self.world)
            out["rl/completions_sampled"] = round(means["refill/completions"] * self.world)
            out["rl/resample_rounds"] = means["refill/rounds"]
        return {
            **out,
            "rl/groups_dropped": dropped,
            "rl/groups_dropped_fraction": dropped / cfg.rollout_batch_size,
            "rl/advantage_abs": means["advantage_abs_sum"] / means["tokens"] if means["tokens"] else 0.0,
            "val/num_eos": round(means["num_eos"] * self.world),
            "kl_coef": self.kl_ctl.coef,
            "lr": self.trained_policy.scheduler.get_last_lr()[0],
            "episodes": done * cfg.completions_per_iteration,
            # every round's tokens: time/generation counts every refill round
            "tokens_per_second": means.get("refill/tokens", means["tokens"])
            * self.world
            / max(means["time/generation"], 1e-9),
        }

    def overlong_means(self, rollout: GroupRollout) -> dict[str, float]:
        """This process's part of the overlong metrics: with --overlong-buffer the mean penalty
        (``objective/overlong_penalty``, <= 0: the part of ``objective/scores`` it took) and the share of completions
        penalised (``rl/overlong_fraction``); with --overlong-filter the share taken out of the loss as truncated
        (``rl/overlong_filtered``)."""
        out = {}
        if self.cfg.overlong_filter:
            out["rl/overlong_filtered"] = (~rollout.ended.bool()).float().mean().item()
        if self.cfg.overlong_buffer is not None:
            penalty = self.overlong_penalties(rollout.response_mask)  # (b,) as the scores took it
            out["objective/overlong_penalty"] = penalty.mean().item()
            out["rl/overlong_fraction"] = (penalty < 0).float().mean().item()
        return out

    def fill_on_policy(self, rollout: GroupRollout) -> None:
        """The policy's log-probs and entropy the rollout skipped (`one_step_on_policy`), and the KL from them: the
        update's forward filled them in; when it ran no forward (every group dropped or every row filtered: one step
        on-policy means one epoch of one minibatch, which holds every row, so no row of any process was in the
        loss), a no-gradient forward of the unchanged policy does."""
        if not rollout.loss_lengths.any():
            seqs = (rollout.query_response, rollout.attention_mask, rollout.completion_mask)
            rollout.logps, rollout.entropy, _, _ = self.response_forwards(seqs, rollout.prompt_width, reference=False)
        rollout.kl = kl_shaped_rewards(
            rollout.scores, rollout.logps, rollout.ref_logps, rollout.response_mask, 0.0, self.cfg.kl_estimator
        )[1]
