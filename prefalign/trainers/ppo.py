"""PPO-RLHF: sample, score, shape rewards with a per-token KL penalty, GAE, clipped PPO updates.

One iteration = one rollout batch of prompts (`rollout`), then ``ppo_epochs`` passes of minibatch
updates over it (`prefalign.trainers.ppo_update`). Policy and value model are separate models with separate
optimizers. The run skeleton (`prefalign.trainers.run.Run`) does outputs, checkpoints, resume and the rest.

Under ``accelerate launch`` with N processes, each process samples, scores and trains on its contiguous
1/N of every rollout batch. What must not depend on N is global: sampling is keyed by (iteration, prompt),
so a response is the same whichever process draws it; whitening, explained variance, the KL controller, the
``--early-stop-kl`` decision and every logged metric use statistics over all processes. Only the main process
writes files.
With ``--heldout-prompts``, `prefalign.trainers.heldout.HeldoutEval` logs gold, proxy and KL on held-out prompts.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from prefalign.errors import UserError
from prefalign.losses import gae, kl_shaped_rewards, masked_whiten
from prefalign.methods import METHODS
from prefalign.models.frozen import load_reference, resolve_frozen_dtype
from prefalign.models.lean import save_activation_memory
from prefalign.models.loading import require_same_vocabulary
from prefalign.rollout import eos_token_ids, refresh_sampling_copy, release_sampling_copy, sampling_copy
from prefalign.rollout.generate import key_seed
from prefalign.rollout.rollout import Rollout
from prefalign.runio import keep_rows_through
from prefalign.trainers.dist import masked_mean_var
from prefalign.trainers.final import save_final_model
from prefalign.trainers.heldout import HeldoutEval
from prefalign.trainers.lora import apply_lora
from prefalign.trainers.metrics import MetricsLogger
from prefalign.trainers.optim import make_optimizer
from prefalign.trainers.ppo_config import PPOConfig
from prefalign.trainers.ppo_metrics import PPOMetrics
from prefalign.trainers.ppo_update import KLController, PPOUpdate
from prefalign.trainers.run import Run

__all__ = ["KLController", "PPOConfig", "PPOTrainer"]


class PPOTrainer(HeldoutEval, PPOUpdate, PPOMetrics, Run):
    command = "ppo"
    unit = "iter"

    def __init__(self, cfg: PPOConfig, reward_source=None):
        """``reward_source``: an object with ``score(prompts, completions) -> (B,)``; default from ``cfg.reward``."""
        super().__init__(cfg)
        self.reward_source = reward_source
        self.metrics: MetricsLogger | None = None  # set by on_start: samples go to the trackers too
        self.samples_path: Path | None = None
        self.seconds_per_iteration = 0.0

    # ---------------------------------------------------------------- setup
    def init_backend(self) -> None:
        """The skeleton's precision and backend, then what --frozen-dtype resolves to at that precision."""
        super().init_backend()
        self.frozen_dtype = resolve_frozen_dtype(self.cfg.frozen_dtype, self.precision)

    @property
    def frozen_dtype_name(self) -> str:
        """The resolved --frozen-dtype as run.json records it: float32 or bfloat16."""
        return str(self.frozen_dtype).removeprefix("torch.")

    def check_backend(self) -> None:
        cfg = self.cfg
        if self.backend.deepspeed:
            raise UserError(
                "ppo does not run under DeepSpeed yet (DeepSpeed would have to step its two models' "
                "optimizers); shard PPO with FSDP (examples/accelerate/fsdp.yaml) or launch it with DDP "
                "(examples/accelerate/ddp.yaml)"
            )
        rows_per_step = cfg.num_minibatches * cfg.grad_accum * self.world
        if cfg.rollout_batch_size % rows_per_step:
            raise UserError(
                f"--rollout-batch-size {cfg.rollout_batch_size} must be divisible by --num-minibatches "
                f"x --grad-accum x processes = {cfg.num_minibatches} x {cfg.grad_accum} x {self.world} = "
                f"{rows_per_step}, so every process takes an equal share of every minibatch"
            )

    def setup(self) -> None:
        """Prompts, reward source, held-out prompts and judge, policy, reference and value model (LoRA on both when
        asked)."""
        from prefalign.data import load_prompt_rows_reported, tokenize_prompts
        from prefalign.models import load_causal_lm, load_tokenizer
        from prefalign.rewards import load_reward_source

        cfg = self.cfg
        self.tokenizer = tok = load_tokenizer(cfg.model)
        # the rows' other columns (name -> one value per prompt) go to a module:function reward
        self.prompts, self.prompt_columns, report = load_prompt_rows_reported(
            cfg.prompts, tok, chat=cfg.chat, split=cfg.prompts_split
        )
        self.data_info = {"source": cfg.prompts, "rows": report.total, "kept": report.kept, "dropped": report.counts}
        self.prompt_ids = tokenize_prompts(self.prompts, tok, cfg.max_prompt_length)
        if len(self.prompts) < cfg.rollout_batch_size:
            raise UserError(
                f"{cfg.prompts}: {len(self.prompts)} prompts are fewer than one rollout batch "
                f"({cfg.rollout_batch_size}); lower --rollout-batch-size"
            )
        if self.reward_source is None:
            self.reward_source = load_reward_source(
                cfg.reward,
                batch_size=cfg.reward_batch_size,
                device=str(self.accelerator.device),
                autocast_dtype=self.frozen_dtype,
            )
        self.setup_heldout()
        self.policy = load_causal_lm(cfg.model)
        if cfg.lora_r:
            self.policy = apply_lora(self.policy, cfg)
            self.ref_model = None  # the reference is the policy with its adapter off
        else:
            self.ref_model = load_reference(cfg.ref or cfg.model, self.accelerator.device, self.frozen_dtype)
            if cfg.ref:
                require_same_vocabulary(self.ref_model, cfg.ref, tok, f"--ref {cfg.ref}")
        self.value = self.load_value()
        # per trained model, for run.json; a critic-free subclass (prefalign rl) loads no value model
        self.activations = {
            name: save_activation_memory(
                m, gradient_checkpointing=cfg.gradient_checkpointing, lean=cfg.lean_activations
            )
            for name, m in (("policy", self.policy), ("value", self.value))
            if m is not None
        }

    def load_value(self):
        """The critic: --value-model, else the reward model (N+ implementation details), else --model."""
        from prefalign.models.value import load_value_model
        from prefalign.rewards import RewardModel

        cfg = self.cfg
        if cfg.value_model:
            self.value_base = cfg.value_model
            value = load_value_model(cfg.value_model, head_init_std=cfg.head_init_std)  # a causal LM's new head
            require_same_vocabulary(value, cfg.value_model, self.tokenizer, f"--value-model {cfg.value_model}")
        elif isinstance(self.reward_source, RewardModel):
            self.value_base = cfg.reward
            value = load_value_model(cfg.reward)
            # a reward model scores with its own tokenizer, but the critic reads the policy's token ids
            what = f"--reward {cfg.reward} (the critic's initialisation: pass --value-model, e.g. {cfg.model})"
            require_same_vocabulary(value, cfg.reward, self.tokenizer, what)
        else:
            self.value_base = cfg.model
            value = load_value_model(cfg.model, head_init_std=cfg.head_init_std)
        if cfg.lora_r:
            value = apply_lora(value, cfg, task_type="SEQ_CLS", modules_to_save=["score"])
        return value

    def build(self) -> None:
        """Optimizers, both models prepared by the backend, the sampling copy, the KL controller."""
        cfg = self.cfg
        self.total_steps = cfg.total_steps
        updates = self.total_steps * cfg.ppo_epochs * cfg.num_minibatches  # optimizer steps over the run
        p_opt, p_sched = make_optimizer(self.policy, cfg, cfg.learning_rate, updates)
        v_opt, v_sched = make_optimizer(self.value, cfg, cfg.value_learning_rate or cfg.learning_rate, updates)
        # self.policy / self.value stay the plain (or peft) models: sampling, no-grad forwards, checkpoints
        self.trained_policy = self.backend.prepare("policy", self.policy, p_opt, p_sched)
        self.trained_value = self.backend.prepare("value", self.value, v_opt, v_sched)
        self.trained = [self.trained_policy, self.trained_value]
        self.build_sampling()

    def build_sampling(self) -> None:
        """The sampling copy, the KL controller, the EOS ids and the rollouts' `SamplingConfig`."""
        cfg = self.cfg
        # rollouts sample from a bf16 copy under bf16 precision (refreshed after every update); old log-probs,
        # reference log-probs and values still come from the training weights. A sharded policy has no whole copy.
        use_copy = self.precision == "bf16" and not self.backend.sharded
        self.sampler = sampling_copy(self.policy, torch.bfloat16) if use_copy else self.policy
        self.kl_ctl = KLController(cfg.kl_coef, cfg.adaptive_kl, cfg.target_kl, cfg.kl_horizon)
        self.eos_ids = eos_token_ids(self.policy, self.tokenizer)
        self.sampling = cfg.sampling()
        self.last_row: dict[str, float] = {}

    def check_inputs(self) -> None:
        """A reward function (or held-out judge) that needs a column the prompt rows (or held-out rows) lack is
        refused before the output exists."""
        from prefalign.reward_mix import check_reward_columns

        check_reward_columns(self.reward_source, self.prompt_columns)
        self.check_heldout_inputs()

    def run_info(self) -> dict:
        cfg = self.cfg
        return {
            "prompts": len(self.prompts),
            "data": self.data_info,
            "total_iterations": self.total_steps,
            "episodes": self.total_steps * cfg.rollout_batch_size,
            "reward": getattr(self.reward_source, "name", cfg.reward),
            "frozen_dtype": self.frozen_dtype_name,
            "activations": self.activations,
            "policy_trainable_parameters": sum(p.numel() for p in self.policy.parameters() if p.requires_grad),
            "value_trainable_parameters": sum(p.numel() for p in self.value.parameters() if p.requires_grad),
            **self.heldout_info(),
        }

    def resume_shape(self) -> dict[str, int]:
        """Flags a resumed run must share with its checkpoint to continue it: the prompts each iteration reads and
        the completions' keys (the rollout batch), the optimizer steps per iteration, and with several minibatches
        the process count (each process cuts its minibatches from its own rows). --max-steps may change (a run is
        extended as the dataset trainers' are)."""
        cfg = self.cfg
        shape = {
            "--rollout-batch-size": cfg.rollout_batch_size,
            "--ppo-epochs": cfg.ppo_epochs,
            "--num-minibatches": cfg.num_minibatches,
        }
        return shape | ({"processes": self.world} if cfg.num_minibatches > 1 else {})

    def checkpoint_state(self) -> dict:
        return {"kl_controller": self.kl_ctl.state_dict(), "resume_shape": self.resume_shape()}

    def check_resumable(self, path: Path, state: dict) -> None:
        """Refuse a checkpoint written with another `resume_shape` (checkpoints older than the check carry none)."""
        saved, now = state.get("resume_shape", {}), self.resume_shape()
        for name in saved.keys() & now.keys():
            if saved[name] != now[name]:
                raise UserError(
                    f"{path}: written with {name} {saved[name]}, now {now[name]}; resume with the same, so the "
                    "prompts, completion keys and optimizer steps of each iteration continue"
                )

    def load_state(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_controller"])
        refresh_sampling_copy(self.sampler, self.policy)

    def on_start(self, start: int, metrics: MetricsLogger) -> None:
        """``samples.jsonl``: a resumed run drops the rows after its checkpoint. A fresh
        run's held-out starting point (a collective)."""
        self.metrics = metrics
        self.samples_path = self.out_dir / "samples.jsonl"
        # a fresh run finds none: the output directory was empty, or --overwrite removed it
        if self.accelerator.is_main_process and self.cfg.resume is not None and self.samples_path.exists():
            keep_rows_through(self.samples_path, start)
        self.heldout_start(start, metrics)

    def log_row(self, done: int) -> dict[str, float]:
        """The iteration's metrics, with its held-out point when one is due (a collective)."""
        return {**self.last_row, **self.heldout_row(done)}

    def prompt_batch(self, step: int) -> list[int]:
        """Prompt indices of iteration ``step``: a seeded permutation per pass over the prompts."""
        n, b = len(self.prompts), self.cfg.rollout_batch_size
        epoch, offset = divmod(step, n // b)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
        return perm[offset * b : (offset + 1) * b].tolist()

    def shard(self, idx: list[int]) -> list[int]:
        """This process's contiguous share of a global prompt batch (process 0 holds the first rows)."""
        n = len(idx) // self.world
        r = self.accelerator.process_index
        return idx[r * n : (r + 1) * n]

    def whiten(self, x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
        """`masked_whiten` with the mean and variance of all processes' masked tokens."""
        mean, var = masked_mean_var(self.accelerator, x, mask)
        return masked_whiten(x, mask, shift_mean=shift_mean, mean=mean, var=var)

    # ---------------------------------------------------------------- rollout
    @torch.no_grad()
    def rollout(self, idx: list[int], step: int, timing: dict) -> Rollout:
        """This process's rollout of iteration ``step``: prompts ``idx`` (its shard). A collective: whitening
        uses statistics over every process's shard."""
        cfg = self.cfg
        # 1. sample responses, each from its own stream keyed by (iteration, prompt), so it does not depend on
        #    the batch layout or the process count; each is cut after its first EOS (generate() does it)
        # 2. masks: the response of every row starts at column P
        gen, query_response, attention_mask, completion_mask = self.sample(
            [self.prompt_ids[i] for i in idx], [key_seed(step, i) for i in idx], timing
        )
        response_mask = gen.response_mask  # (B, R)
        # 3. old log-probs (at the sampling temperature; recorded while decoding where they could be), reference
        #    log-probs, values
        t1 = time.perf_counter()
        seqs = (query_response, attention_mask, completion_mask)
        logps, entropy, ref_logps, values = self.response_forwards(
            seqs, gen.prompt_ids.shape[1], gen.recorded, value=True
        )
        timing["time/logprobs"] = time.perf_counter() - t1
        # 4. score the decoded text with the reward source; 5. clip, then penalise responses that never ended
        prompts, texts, scores = self.score_completions(idx, gen, timing, f"--reward {cfg.reward}")
        # 6. per-token rewards: -kl_coef * KL on every token, the score on the last real token
        rewards, kl, non_score = kl_shaped_rewards(
            scores, logps, ref_logps, response_mask, self.kl_ctl.coef, cfg.kl_estimator
        )
        if cfg.whiten_rewards:
            rewards = self.whiten(rewards, response_mask, shift_mean=False)
        # 7. GAE on the critic's values, advantages whitened over the whole batch (all processes)
        advantages, returns = gae(rewards, values, response_mask, cfg.gamma, cfg.lam)
        advantages = self.whiten(advantages, response_mask)
        return Rollout.of_samples(
            gen,
            (query_response, attention_mask, completion_mask),
            (rewards, kl, non_score),
            logps=logps,
            ref_logps=ref_logps,
            values=values,
            entropy=entropy,
            scores=scores,
            advantages=advantages,
            returns=returns,
            prompts=prompts,
            completions=texts,
        )

    # ---------------------------------------------------------------- one iteration
    def train_step(self, step: int) -> None:
        """One PPO iteration: rollout, update, metrics, samples."""
        cfg = self.cfg
        t_start = time.perf_counter()
        timing: dict[str, float] = {}
        rollout = self.rollout(self.shard(self.prompt_batch(step)), step, timing)
        t_update = time.perf_counter()
        release_sampling_copy(self.sampler, self.policy)  # a bf16 copy's storage serves the update meanwhile
        update_stats = self.update(rollout, step + 1)
        refresh_sampling_copy(self.sampler, self.policy)
        timing["time/update"] = time.perf_counter() - t_update
        done = step + 1
        self.last_row = self.iteration_metrics(rollout, update_stats, timing, done)
        self.kl_ctl.update(self.last_row["objective/kl"], cfg.completions_per_iteration)  # global: the same everywhere
        if self.accelerator.is_main_process and (done % cfg.sample_every == 0 or done == 1 or done == self.total_steps):
            self.log_samples(done, rollout)
        self.seconds_per_iteration = time.perf_counter() - t_start

    def save_final(self, out: Path) -> None:
        """``final/`` (the policy; adapter with LoRA, plus ``final-merged/`` with --merge-lora) and ``value/`` (the
        value model), Hugging Face format, each with its model card. Every process calls it (under FSDP the weights
        are gathered)."""
        save_final_model(
            self.backend,
            out / "final",
            self.trained_policy,
            self.tokenizer,
            merged=self.cfg.merge_lora,
            card=self.card(),
        )
        save_final_model(
            self.backend,
            out / "value",
            self.trained_value,
            self.tokenizer,
            card=self.card(METHODS["value"], base=self.value_base),
        )
