"""The online trainers' held-out evaluation (`prefalign ppo`, `prefalign rl`): over-optimisation made visible.

Gao, Schulman & Hilton (2022, "Scaling Laws for Reward Model Overoptimization"): optimised against a proxy reward,
a policy's proxy score keeps rising while its gold score peaks and then falls, both plotted against its KL to the
reference. With ``--heldout-prompts``, `HeldoutEval` measures one point of that curve before the first update, every
``--heldout-every`` iterations and after the last: one completion per held-out prompt, sampled from the current
policy the way rollouts are (`PPOTrainer.sample`, the bf16 sampling copy when there is one), scored by the
trainer's reward (proxy: the raw score, no ``--score-clip``, no ``--missing-eos-penalty``) and by
``--heldout-judge`` (gold), with its KL to the reference.

- Common random numbers: prompt ``i`` draws from the stream ``key_seed(HELDOUT_STREAM, i)`` at every point, so
  the difference between two points is the policy's, not the draw's.
- No effect on training: keyed sampling draws from its own generators, the policy's forwards run in eval mode, and
  the global RNG state is put back afterwards (a judge of the user's may draw random numbers), so the training
  metrics and weights are those of a run without it.
- Under N processes each takes a contiguous 1/N of the prompts, the remainder left out: every process makes as many
  sampling calls (a collective under FSDP). The values are gathered in prompt order, so N processes log the numbers
  of one (to float noise).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from prefalign.errors import UserError
from prefalign.rollout.generate import key_seed
from prefalign.trainers.checkpoint import rng_state, set_rng_state
from prefalign.trainers.ppo_sampling import RolloutSampling

if TYPE_CHECKING:
    from prefalign.rewards import RewardSource
    from prefalign.trainers.metrics import MetricsLogger

HELDOUT_STREAM = -1
"""First part of a held-out prompt's sampling key, ``key_seed(HELDOUT_STREAM, i)``: a rollout's keys start with
the iteration, which is never negative, so no training row draws from a held-out stream."""


class HeldoutEval(RolloutSampling):
    """The held-out half of `prefalign.trainers.ppo.PPOTrainer` (a mixin: it samples, scores and runs forwards
    through the trainer's `RolloutSampling`)."""

    heldout_judge: RewardSource | None = None
    """The gold judge; None: no held-out evaluation."""

    if TYPE_CHECKING:  # what it reads of the trainer (`Run`, `PPOTrainer`) beyond `RolloutSampling`'s
        world: int
        total_steps: int

    # ---------------------------------------------------------------- setup
    def setup_heldout(self) -> None:
        """The first --heldout-limit held-out prompts, their other columns and token ids, this process's share, and
        the gold judge (nothing without --heldout-prompts)."""
        from prefalign.data import load_prompt_rows_reported, take_rows, tokenize_prompts
        from prefalign.rewards import load_reward_source

        cfg = self.cfg
        if not cfg.heldout_prompts:
            return
        assert cfg.heldout_judge, "validate() requires --heldout-judge with --heldout-prompts"
        prompts, columns, _ = load_prompt_rows_reported(
            cfg.heldout_prompts, self.tokenizer, chat=cfg.chat, split=cfg.heldout_split
        )
        n = min(len(prompts), cfg.heldout_limit or len(prompts))
        share = n // self.world
        if share == 0:
            raise UserError(
                f"--heldout-prompts {cfg.heldout_prompts}: {n} prompts for {self.world} processes; give at least "
                "one per process"
            )
        self.heldout_texts = prompts[:n]
        self.heldout_columns = take_rows(columns, list(range(n)))
        self.heldout_ids = tokenize_prompts(self.heldout_texts, self.tokenizer, cfg.max_prompt_length)
        first = self.accelerator.process_index * share
        self.heldout_rows = list(range(first, first + share))  # this process's prompts
        self.heldout_judge = load_reward_source(
            cfg.heldout_judge, batch_size=cfg.reward_batch_size, device=str(self.accelerator.device)
        )

    def check_heldout_inputs(self) -> None:
        """A judge or reward function that needs a column the held-out rows lack is refused before the output
        exists."""
        from prefalign.reward_mix import check_reward_columns

        if self.heldout_judge is None:
            return
        for flag, source in (("--heldout-judge", self.heldout_judge), ("--reward", self.reward_source)):
            try:
                check_reward_columns(source, self.heldout_columns)
            except UserError as e:
                raise UserError(f"--heldout-prompts {self.cfg.heldout_prompts} ({flag}): {e}") from None

    def heldout_info(self) -> dict[str, Any]:
        """What ``run.json`` records of the held-out evaluation (``heldout``: None when off)."""
        if self.heldout_judge is None:
            return {"heldout": None}
        cfg = self.cfg
        return {
            "heldout": {
                "source": cfg.heldout_prompts,
                "prompts": len(self.heldout_rows) * self.world,
                "judge": getattr(self.heldout_judge, "name", cfg.heldout_judge),
                "every": cfg.heldout_every,
            }
        }

    # ---------------------------------------------------------------- when
    def heldout_start(self, start: int, metrics: MetricsLogger) -> None:
        """The starting point, before the first update of a fresh run, as a row of its own at step 0 (a collective);
        a resumed run logged it already."""
        if self.heldout_judge is not None and start == 0:
            metrics.log(0, self.heldout_point())

    def heldout_row(self, done: int) -> dict[str, float]:
        """Iteration ``done``'s held-out point when one is due (every --heldout-every and the last iteration), else
        ``{}``; a collective, called with the iteration's metrics row."""
        if self.heldout_judge is None or (done % self.cfg.heldout_every and done != self.total_steps):
            return {}
        return self.heldout_point()

    # ---------------------------------------------------------------- the evaluation
    @torch.no_grad()
    def heldout_point(self) -> dict[str, float]:
        """Gold, proxy and KL of the current policy on the held-out prompts, over every process (a collective)."""
        acc = self.accelerator
        t0 = time.perf_counter()
        saved = rng_state()
        was_training = self.policy.training
        self.policy.eval()
        try:
            chunk = max(1, self.cfg.completions_per_iteration // self.world)  # a rollout's rows per process: fit
            rows = self.heldout_rows
            local = torch.cat([self.heldout_batch(rows[i : i + chunk]) for i in range(0, len(rows), chunk)])
        finally:
            self.policy.train(was_training)
            set_rng_state(saved)
        values = acc.gather(local.to(acc.device)).double().cpu()  # (N, 3) in prompt order: gold, proxy, kl
        gold, proxy, kl = values.unbind(1)
        return {
            "heldout/gold": gold.mean().item(),
            "heldout/gold_std": gold.std(unbiased=False).item(),
            "heldout/proxy": proxy.mean().item(),
            "heldout/kl": kl.mean().item(),
            "heldout/n": len(gold),
            "time/heldout": time.perf_counter() - t0,
        }

    def heldout_batch(self, rows: list[int]) -> torch.Tensor:
        """``(b, 3)`` float32 CPU: gold, proxy and sequence KL of one completion per held-out prompt of ``rows``."""
        from prefalign.data import take_rows
        from prefalign.rewards import check_scores, score_with_columns

        cfg, judge = self.cfg, self.heldout_judge
        assert judge is not None, "setup_heldout loaded the judge"
        keys = [key_seed(HELDOUT_STREAM, i) for i in rows]  # the same at every point: common random numbers
        gen, *seqs = self.sample([self.heldout_ids[i] for i in rows], keys, {}, entropy=False)
        # k1 per token at the sampling temperature, summed over the response: `prefalign eval`'s KL; the policy's
        # log-probs recorded while decoding where they were (`old_logprobs_from_decode`); no entropy
        logps, _, ref_logps, _ = self.response_forwards(
            tuple(seqs), gen.prompt_ids.shape[1], gen.recorded, entropy=False
        )
        kl = ((logps - ref_logps) * gen.response_mask).sum(1)  # (b,)
        prompts, texts = [self.heldout_texts[i] for i in rows], self.decode_completions(gen)
        columns = take_rows(self.heldout_columns, rows)
        proxy = score_with_columns(self.reward_source, prompts, texts, columns)
        gold = score_with_columns(judge, prompts, texts, columns)
        return torch.stack(
            [
                check_scores(gold, len(rows), f"--heldout-judge {cfg.heldout_judge}"),
                check_scores(proxy, len(rows), "--reward (held-out evaluation)"),
                kl.cpu(),
            ],
            dim=1,
        )
