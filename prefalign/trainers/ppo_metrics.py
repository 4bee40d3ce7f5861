"""What a PPO iteration logs: the rollout's objective and the update's stats over every process, the progress
bar's fields, and a few samples into ``samples.jsonl`` and the trackers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from prefalign.losses import explained_variance
from prefalign.rollout.rollout import Rollout
from prefalign.trainers.dist import masked_mean_var, mean_across_processes

if TYPE_CHECKING:
    from accelerate import Accelerator

    from prefalign.trainers.backend import Trained
    from prefalign.trainers.metrics import MetricsLogger
    from prefalign.trainers.ppo_config import PPOConfig
    from prefalign.trainers.ppo_update import KLController


class PPOMetrics:
    """The metrics half of `prefalign.trainers.ppo.PPOTrainer` (a mixin: it reads the trainer's rollout, models
    and controllers)."""

    if TYPE_CHECKING:  # what it reads of the trainer (`Run`, `PPOTrainer`)
        accelerator: Accelerator
        world: int
        trained_policy: Trained
        kl_ctl: KLController
        last_row: dict[str, float]
        seconds_per_iteration: float
        metrics: MetricsLogger | None
        samples_path: Path | None

        @property
        def cfg(self) -> PPOConfig: ...

    @staticmethod
    def rollout_means(rollout: Rollout) -> dict[str, float]:
        """This process's per-row means of the rollout's objective (scores, sequence KL, entropy, shaped reward)
        and response length, and its counts (``num_eos``, ``tokens``): what `iteration_metrics` averages."""
        mask = rollout.response_mask
        non_score = (rollout.non_score_rewards * mask).sum(1)  # (b,)
        return {
            "objective/scores": rollout.scores.mean().item(),
            "objective/kl": (rollout.kl * mask).sum(1).mean().item(),
            "objective/entropy": (rollout.entropy * mask).sum(1).mean().item(),
            "objective/non_score_reward": non_score.mean().item(),
            "objective/rlhf_reward": (rollout.scores + non_score).mean().item(),
            "val/response_length": mask.sum(1).float().mean().item(),
            "num_eos": float(rollout.ended.sum()),
            "tokens": float(mask.sum()),
        }

    def iteration_metrics(self, rollout: Rollout, update_stats: dict, timing: dict, done: int) -> dict[str, float]:
        """The iteration's metrics over every process (a collective)."""
        acc, mask = self.accelerator, rollout.response_mask
        # this process's means over its rows (every process holds as many) and counts, then over all processes
        means = mean_across_processes(acc, {**self.rollout_means(rollout), **update_stats, **timing})
        _, var_returns = masked_mean_var(acc, rollout.returns, mask)
        _, var_residual = masked_mean_var(acc, rollout.returns - rollout.values, mask)
        return {
            **{
                k: means[k]
                for k in (
                    "objective/scores",
                    "objective/kl",
                    "objective/entropy",
                    "objective/non_score_reward",
                    "objective/rlhf_reward",
                )
            },
            **{k: means[k] for k in update_stats},
            "val/explained_variance": explained_variance(
                rollout.values, rollout.returns, mask, var_returns=var_returns, var_residual=var_residual
            ).item(),
            "val/num_eos": round(means["num_eos"] * self.world),
            "val/response_length": means["val/response_length"],
            "kl_coef": self.kl_ctl.coef,
            "lr": self.trained_policy.scheduler.get_last_lr()[0],
            "episodes": done * self.cfg.rollout_batch_size,
            **{k: means[k] for k in timing},
            "tokens_per_second": means["tokens"] * self.world / max(means["time/generation"], 1e-9),
        }

    def log_row(self, done: int) -> dict[str, float]:
        return self.last_row

    def progress(self) -> dict[str, str]:
        row = self.last_row
        return {
            "score": f"{row['objective/scores']:.3f}",
            "kl": f"{row['objective/kl']:.2f}",
            "s/it": f"{self.seconds_per_iteration:.1f}",
        }

    def log_samples(self, step: int, rollout: Rollout, n: int = 4) -> None:
        """The first ``n`` prompts and completions of this iteration into ``samples.jsonl`` and the trackers."""
        if self.samples_path is None or self.metrics is None:  # not started by the run skeleton: nowhere to write
            return
        rows = [
            {
                "step": step,
                "prompt": rollout.prompts[i],
                "completion": rollout.completions[i],
                "score": round(rollout.scores[i].item(), 4),
            }
            for i in range(min(n, len(rollout.prompts)))
        ]
        with self.samples_path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        self.metrics.log_table(step, "samples", rows)
