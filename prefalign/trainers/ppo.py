"""PPO-RLHF: sample, score, shape rewards with a per-token KL penalty, GAE, clipped PPO updates.

One iteration = one rollout batch of prompts (`rollout`), then ``ppo_epochs`` passes of minibatch
updates over it (`update`). Policy and value model are separate models with separate optimizers.

Under ``accelerate launch`` with N processes, each process samples, scores and trains on its contiguous
1/N of every rollout batch. What must not depend on N is global: sampling is keyed by (iteration, prompt)
(`KeyedSampler`), so a response is the same whichever process draws it; whitening, explained variance,
the KL controller, the ``--early-stop-kl`` decision and every logged metric use statistics over all
processes; each micro-batch's losses are weighted by its share of the minibatch's tokens over all processes,
so DDP's accumulated gradient average is the token mean over the minibatch's rows. Only the main process
writes files.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch

from prefalign.errors import UserError
from prefalign.losses import (
    apply_missing_eos_penalty,
    explained_variance,
    gae,
    kl_shaped_rewards,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from prefalign.models.logprobs import completion_logprobs
from prefalign.models.value import token_values
from prefalign.rollout import (
    cut_at_stop,
    eos_token_ids,
    generate,
    refresh_sampling_copy,
    sampling_copy,
)
from prefalign.rollout.generate import key_seed
from prefalign.rollout.rollout import Rollout
from prefalign.runio import prepare_output_dir, run_in_output_dir, write_config, write_json
from prefalign.trainers.checkpoint import (
    PREFIX,
    CheckpointManager,
    is_deepspeed,
    is_sharded,
    load_training_state,
    rng_state,
    set_rng_state,
    training_state,
)
from prefalign.trainers.dist import masked_mean_var, max_across_processes, mean_across_processes
from prefalign.trainers.guard import GracefulStop, NonFiniteGuard
from prefalign.trainers.lora import adapter_off, apply_lora
from prefalign.trainers.loop import (
    Forward,
    check_mergeable,
    check_still_tied,
    inner_optimizer,
    make_accelerator,
    make_optimizer,
    resolve_precision,
    save_final_model,
)
from prefalign.trainers.metrics import MetricsLogger, RunningMean
from prefalign.trainers.ppo_config import PPOConfig  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


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


class PPOTrainer:
    def __init__(self, cfg: PPOConfig, reward_source=None):
        """``reward_source``: an object with ``score(prompts, completions) -> (B,)``; default from ``cfg.reward``."""
        self.cfg = cfg
        self.reward_source = reward_source

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        from accelerate.utils import set_seed

        from prefalign.data import load_prompts, tokenize_prompts
        from prefalign.models import load_causal_lm, load_tokenizer
        from prefalign.models.value import load_value_model
        from prefalign.rewards import RewardModel, load_reward_source

        cfg = self.cfg
        self.precision = resolve_precision(cfg.precision)
        self.accelerator = acc = make_accelerator(self.precision)
        if is_deepspeed(acc):
            raise UserError("ppo does not run under DeepSpeed yet (DeepSpeed would have to step its two models' "
                            "optimizers); shard PPO with FSDP (examples/accelerate/fsdp.yaml) or launch it with DDP "
                            "(examples/accelerate/ddp.yaml)")
        # FSDP: every forward is a collective through the sharded root (the engines); sampling decodes in step on
        # every process until all are done
        self.sharded = is_sharded(acc)
        check_mergeable(acc, cfg.merge_lora)
        self.world = world = acc.num_processes
        share = cfg.num_minibatches * cfg.grad_accum * world
        if cfg.rollout_batch_size % share:
            raise UserError(f"--rollout-batch-size {cfg.rollout_batch_size} must be divisible by --num-minibatches "
                            f"x --grad-accum x processes = {cfg.num_minibatches} x {cfg.grad_accum} x {world} = "
                            f"{share}, so every process takes an equal share of every minibatch")
        set_seed(cfg.seed)

        self.tokenizer = tok = load_tokenizer(cfg.model)
        self.prompts = load_prompts(cfg.prompts, tok, chat=cfg.chat, split=cfg.prompts_split)
        self.prompt_ids = tokenize_prompts(self.prompts, tok, cfg.max_prompt_length)
        if len(self.prompts) < cfg.rollout_batch_size:
            raise UserError(f"{cfg.prompts}: {len(self.prompts)} prompts are fewer than one rollout batch "
                            f"({cfg.rollout_batch_size}); lower --rollout-batch-size")
        if self.reward_source is None:
            self.reward_source = load_reward_source(cfg.reward, batch_size=cfg.reward_batch_size,
                                                    device=str(acc.device))

        policy = load_causal_lm(cfg.model)
        if cfg.lora_r:
            policy = apply_lora(policy, cfg)
            self.ref_model = None  # the reference is the policy with its adapter off
        else:
            # accelerate places only what it prepares: the frozen reference goes to the device by hand
            self.ref_model = load_causal_lm(cfg.ref or cfg.model).requires_grad_(False).eval().to(acc.device)
        if cfg.value_model:
            value = load_value_model(cfg.value_model)
        elif isinstance(self.reward_source, RewardModel):
            value = load_value_model(cfg.reward)  # N+ details: the critic starts from the reward model
        else:
            value = load_value_model(cfg.model, head_init_std=cfg.head_init_std)
        if cfg.lora_r:
            value = apply_lora(value, cfg, task_type="SEQ_CLS", modules_to_save=["score"])
        if cfg.gradient_checkpointing:
            for m in (policy, value):
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        total = cfg.total_steps
        updates = total * cfg.ppo_epochs * cfg.num_minibatches  # optimizer steps over the run
        p_opt, p_sched = make_optimizer(policy, cfg, cfg.learning_rate, updates)
        v_opt, v_sched = make_optimizer(value, cfg, cfg.value_learning_rate or cfg.learning_rate, updates)
        # self.policy / self.value stay the plain (or peft) models: sampling, no-grad forwards, checkpoints.
        # Gradient forwards go through the engines, so a DDP wrapper sees them and all-reduces the gradients.
        self.policy, self.value = policy, value
        # one model per prepare call: accelerate's FSDP2 path takes a single model (and its optimizer) at a time
        self.policy_engine, self.p_opt = acc.prepare(Forward(policy), p_opt)
        self.value_engine, self.v_opt = acc.prepare(Forward(value), v_opt)
        check_still_tied(policy)
        self.p_sched, self.v_sched = p_sched, v_sched
        # rollouts sample from a bf16 copy under bf16 precision (refreshed after every update); old log-probs,
        # reference log-probs and values still come from the training weights
        self.sampler = sampling_copy(policy, torch.bfloat16) if self.precision == "bf16" and not self.sharded \
            else policy  # a sharded policy has no whole copy to cast
        self.kl_ctl = KLController(cfg.kl_coef, cfg.adaptive_kl, cfg.target_kl, cfg.kl_horizon)
        self.eos_ids = eos_token_ids(self.policy, tok)
        self.sampling = cfg.sampling()
        # everything is loaded and checked: only now does the run touch its output directory
        self.out_dir = prepare_output_dir(cfg.output, overwrite=cfg.overwrite, resume=cfg.resume is not None)
        acc.wait_for_everyone()  # every process has checked the directory before the main one writes into it

    def prompt_batch(self, step: int) -> list[int]:
        """Prompt indices of iteration ``step``: a seeded permutation per pass over the prompts."""
        n, b = len(self.prompts), self.cfg.rollout_batch_size
        per_pass = n // b
        epoch, offset = divmod(step, per_pass)
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
    def frozen_forward(self, engine, model, fn, *args, **kwargs):
        """``fn(model, *args)`` without gradients: on the plain ``model`` (or sampling copy), or through its
        ``engine`` under FSDP, where only the sharded root gathers the weights (a collective)."""
        return engine(fn, *args, **kwargs) if self.sharded else fn(model, *args, **kwargs)

    @torch.no_grad()
    def rollout(self, idx: list[int], step: int, timing: dict) -> Rollout:
        """This process's rollout of iteration ``step``: prompts ``idx`` (its shard). A collective: whitening
        uses statistics over every process's shard."""
        from prefalign.data import PromptCollator

        cfg, acc, tok = self.cfg, self.accelerator, self.tokenizer
        dev = acc.device
        t0 = time.perf_counter()
        # 1. sample responses, each from its own stream keyed by (iteration, prompt), so it does not depend on
        #    the batch layout or the process count; each is cut after its first EOS (generate() does it)
        batch = PromptCollator(tok.pad_token_id)([self.prompt_ids[i] for i in idx])
        with acc.autocast():
            gen = self.frozen_forward(self.policy_engine, self.sampler, generate, batch["input_ids"].to(dev),
                                      batch["attention_mask"].to(dev), self.sampling, eos_ids=self.eos_ids,
                                      pad_id=tok.pad_token_id, tokenizer=tok, seed=cfg.seed, synced=self.sharded,
                                      row_keys=[key_seed(step, i) for i in idx])
        timing["time/generation"] = time.perf_counter() - t0
        # 2. masks: the response of every row starts at column P
        qr = torch.cat([gen.prompt_ids, gen.response_ids], dim=1)  # (B, P+R)
        attn = torch.cat([gen.prompt_mask, gen.response_mask], dim=1)  # (B, P+R)
        comp = torch.cat([torch.zeros_like(gen.prompt_mask), gen.response_mask], dim=1)  # (B, P+R)
        rmask = gen.response_mask  # (B, R)
        p = gen.prompt_ids.shape[1]
        # 3. old log-probs (at the sampling temperature), reference log-probs, values
        t1 = time.perf_counter()
        with acc.autocast():
            logps, entropy = self.frozen_forward(self.policy_engine, self.policy, completion_logprobs, qr, attn, comp,
                                                 temperature=cfg.temperature, return_entropy=True)
            if self.ref_model is not None:  # a whole frozen copy on every process
                ref_logps = completion_logprobs(self.ref_model, qr, attn, comp, temperature=cfg.temperature)
            else:
                with adapter_off(self.policy):
                    ref_logps = self.frozen_forward(self.policy_engine, self.policy, completion_logprobs, qr, attn,
                                                    comp, temperature=cfg.temperature)
            values = self.frozen_forward(self.value_engine, self.value, token_values, qr, attn, comp)
        logps, entropy, ref_logps, values = (x[:, p:].float() for x in (logps, entropy, ref_logps, values))
        timing["time/logprobs"] = time.perf_counter() - t1
        # 4. score the decoded text with the reward source
        t2 = time.perf_counter()
        prompts = [self.prompts[i] for i in idx]
        texts = [cut_at_stop(t, cfg.stop) for t in tok.batch_decode(gen.response_ids, skip_special_tokens=True)]
        from prefalign.rewards import check_scores

        scores = check_scores(self.reward_source.score(prompts, texts), len(texts), f"--reward {cfg.reward}").to(dev)
        timing["time/scoring"] = time.perf_counter() - t2
        # 5. clip, then penalise responses that never ended
        if cfg.score_clip is not None:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
        scores = apply_missing_eos_penalty(scores, gen.ended.to(dev), cfg.missing_eos_penalty)
        # 6. per-token rewards: -kl_coef * KL on every token, the score on the last real token
        rewards, kl, non_score = kl_shaped_rewards(scores, logps, ref_logps, rmask, self.kl_ctl.coef,
                                                   cfg.kl_estimator)
        if cfg.whiten_rewards:
            rewards = self.whiten(rewards, rmask, shift_mean=False)
        # 7. GAE on the critic's values, advantages whitened over the whole batch (all processes)
        advantages, returns = gae(rewards, values, rmask, cfg.gamma, cfg.lam)
        advantages = self.whiten(advantages, rmask)
        return Rollout(qr, attn, comp, rmask, gen.ended, logps, ref_logps, values, entropy, scores, kl,
                       non_score, rewards, advantages, returns, prompts, texts)

    # ---------------------------------------------------------------- update
    def update(self, ro: Rollout, step: int) -> dict[str, float]:
        """``ppo_epochs`` passes of minibatch updates over this process's rows; one optimizer step per minibatch.

        Returns this process's stats, each micro-batch's token mean weighted by its share of the minibatch's
        tokens (x processes) and summed, so their plain average over processes is the token mean over all rows.
        """
        cfg, acc, world = self.cfg, self.accelerator, self.world
        p = ro.prompt_width
        stats = RunningMean()
        self.minibatch_stats: list[dict[str, float]] = []
        self.policy_engine.train()
        self.value_engine.train()
        b = ro.response_mask.shape[0]  # this process's rows: rollout_batch_size / processes
        mb_rows = b // cfg.num_minibatches  # its rows in each minibatch
        micro_rows = mb_rows // cfg.grad_accum
        lengths = acc.gather(ro.response_mask.sum(1)).view(world, b)  # (N, b) response lengths of every process
        for epoch in range(cfg.ppo_epochs):
            # a pure function of (seed, iteration, epoch), the same on every process: minibatch i of process r
            # holds r's local rows perm[i], so lengths[:, perm[i]] counts the minibatch's tokens everywhere
            perm = torch.randperm(b, generator=torch.Generator().manual_seed(key_seed(cfg.seed, step, epoch)))
            epoch_kl = RunningMean()
            for mb in range(cfg.num_minibatches):
                mb_idx = perm[mb * mb_rows : (mb + 1) * mb_rows]
                mb_tokens = float(lengths[:, mb_idx].sum())  # the minibatch's tokens on all processes
                mb_stats: dict[str, float] = defaultdict(float)  # share-weighted sums over the micro-batches
                for micro in range(cfg.grad_accum):
                    idx = mb_idx[micro * micro_rows : (micro + 1) * micro_rows]
                    x = ro.rows(idx)
                    m = x["response_mask"]
                    # DDP averages gradients over processes; weighting each micro-batch's token mean by N x its
                    # share of the minibatch's tokens makes the accumulated average the token mean over the whole
                    # minibatch, whichever rows the micro-batches and processes hold (a plain 1 / grad_accum
                    # would weigh a short micro-batch's tokens more, and 2 processes split rows unlike 1)
                    share = float(m.sum()) * world / mb_tokens
                    with self.no_sync(micro < cfg.grad_accum - 1), acc.autocast():
                        out = self.policy_engine(completion_logprobs, x["query_response"], x["attention_mask"],
                                                 x["completion_mask"], temperature=cfg.temperature,
                                                 return_entropy=cfg.ent_coef > 0)
                        new_logps, ent = out if cfg.ent_coef > 0 else (out, None)
                        new_values = self.value_engine(token_values, x["query_response"], x["attention_mask"],
                                                       x["completion_mask"])
                    pg_loss, pg = ppo_policy_loss(new_logps[:, p:].float(), x["logps"], x["advantages"], m,
                                                  cfg.clip_eps)
                    vf_loss, vf = ppo_value_loss(new_values[:, p:].float(), x["values"], x["returns"], m,
                                                 cfg.vf_clip)
                    loss = pg_loss + cfg.vf_coef * vf_loss
                    if ent is not None:
                        loss = loss - cfg.ent_coef * masked_mean(ent[:, p:].float(), m)
                    acc.backward(loss * share)
                    for k, v in (("loss/policy", pg_loss.detach()), ("loss/value", vf_loss.detach()),
                                 ("policy/approxkl", pg["approxkl"]), ("policy/clipfrac", pg["clipfrac"]),
                                 ("val/ratio", pg["ratio"]), ("val/clipfrac", vf["vf_clipfrac"])):
                        mb_stats[k] += float(v) * share
                norm_p = acc.clip_grad_norm_(self.policy_engine.parameters(), cfg.max_grad_norm or float("inf"))
                norm_v = acc.clip_grad_norm_(self.value_engine.parameters(), cfg.max_grad_norm or float("inf"))
                got = dict(mb_stats)
                # the norms come from all-reduced gradients, a loss is local: all processes must take one branch
                local = NonFiniteGuard.finite(norm_p, norm_v, got["loss/policy"], got["loss/value"])
                finite = max_across_processes(acc, int(not local)) == 0
                for opt, sched in ((self.p_opt, self.p_sched), (self.v_opt, self.v_sched)):
                    if finite:
                        opt.step()
                        sched.step()
                    opt.zero_grad(set_to_none=True)
                self.guard.record(finite, step, self.last_good)
                if not finite:
                    continue
                self.minibatch_stats.append(got)
                stats.add({**got, "policy/grad_norm": norm_p, "val/grad_norm": norm_v})
                epoch_kl.add({"approxkl": got["policy/approxkl"]})
            if cfg.early_stop_kl is not None and epoch + 1 < cfg.ppo_epochs:  # after the last epoch: nothing to stop
                epoch_approxkl = mean_across_processes(acc, epoch_kl.pop()).get("approxkl", 0.0)
                if epoch_approxkl > cfg.early_stop_kl:  # the same value on every process: all stop together
                    stats.add({"policy/early_stopped": 1.0})
                    break
        return stats.pop()

    def no_sync(self, skip: bool):
        """Skip DDP's gradient all-reduce of both models (every micro-batch of a minibatch but the last)."""
        if not skip:
            return nullcontext()
        stack = ExitStack()
        for engine in (self.policy_engine, self.value_engine):
            stack.enter_context(self.accelerator.no_sync(engine))
        return stack

    # ---------------------------------------------------------------- the run
    def train(self) -> dict[str, float]:
        """Run PPO; a user error before the first checkpoint (a reward function that raises on the first
        batch, say) leaves no output directory."""
        return run_in_output_dir(self.cfg, self._train)

    def _train(self) -> dict[str, float]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.setup()
        acc, out, total = self.accelerator, self.out_dir, cfg.total_steps
        main = acc.is_main_process
        ckpts = CheckpointManager(out, cfg.save_total_limit)
        self.guard = NonFiniteGuard(cfg.max_nonfinite_steps)  # its count of skipped steps is saved and resumed
        start = 0
        if cfg.resume is not None:  # every process loads the main process's checkpoint
            path, state, objects = ckpts.load_for_resume(cfg.resume)
            load_training_state(self.policy, inner_optimizer(self.p_opt), objects["policy"],
                                objects["policy_optimizer"], path)
            load_training_state(self.value, inner_optimizer(self.v_opt), objects["value"],
                                objects["value_optimizer"], path)
            self.p_sched.load_state_dict(objects["policy_scheduler"])
            self.v_sched.load_state_dict(objects["value_scheduler"])
            self.kl_ctl.load_state_dict(state["kl_controller"])
            set_rng_state(objects["rng"])
            start = int(state["step"])
            self.guard.skipped = int(state.get("skipped_steps", 0))
            refresh_sampling_copy(self.sampler, self.policy)
            log.info("resuming from %s (iteration %d of %d)", path, start, total)
        if main:
            write_config(out, cfg)
            write_json(out / "run.json", {
                "precision": self.precision, "processes": self.world, "prompts": len(self.prompts),
                "total_iterations": total, "episodes": total * cfg.rollout_batch_size,
                "reward": getattr(self.reward_source, "name", cfg.reward),
                "policy_trainable_parameters": sum(p.numel() for p in self.policy.parameters() if p.requires_grad),
                "value_trainable_parameters": sum(p.numel() for p in self.value.parameters() if p.requires_grad),
                "resumed_from_step": start if cfg.resume else None,
            })
        metrics = MetricsLogger(out, resume_step=start if cfg.resume else None, enabled=main)
        samples_path = out / "samples.jsonl"
        if main and samples_path.exists():  # a fresh run starts empty; a resumed one drops rows after its checkpoint
            kept = [r for r in samples_path.read_text(encoding="utf-8").splitlines()
                    if cfg.resume is not None and r.strip() and json.loads(r)["step"] <= start]
            samples_path.write_text("".join(r + "\n" for r in kept), encoding="utf-8")
        self.last_row: dict[str, float] = {}
        self.last_good = "none yet"
        hint = f"prefalign ppo --config {out / 'config.yaml'} --resume latest"
        # the bar closes before an error propagates, so the error stays the last line on the terminal
        with (tqdm(total=total, initial=start, desc="ppo", unit="iter", disable=not main) as bar,
              GracefulStop(acc) as stop):
            for step in range(start, total):
                self._iteration(step, total, metrics, samples_path, ckpts, bar)
                if step + 1 < total:
                    stop.check(step + 1, total, lambda: self.save_checkpoint(ckpts, step + 1), hint)
        metrics.close()
        acc.wait_for_everyone()
        self.save_final(out)
        return self.last_row

    def _iteration(self, step, total, metrics, samples_path, ckpts, bar) -> None:
        """One PPO iteration: rollout, update, metrics, samples, checkpoint."""
        cfg, acc = self.cfg, self.accelerator
        t_start = time.perf_counter()
        timing: dict[str, float] = {}
        ro = self.rollout(self.shard(self.prompt_batch(step)), step, timing)
        t_update = time.perf_counter()
        upd = self.update(ro, step + 1)
        refresh_sampling_copy(self.sampler, self.policy)
        timing["time/update"] = time.perf_counter() - t_update
        lr = self.p_sched.get_last_lr()[0]
        m = ro.response_mask
        seq_kl = (ro.kl * m).sum(1)  # (b,)
        non_score = (ro.non_score_rewards * m).sum(1)
        # this process's means over its rows (every process holds as many) and counts, then over all processes
        g = mean_across_processes(acc, {
            "objective/scores": ro.scores.mean().item(),
            "objective/kl": seq_kl.mean().item(),
            "objective/entropy": (ro.entropy * m).sum(1).mean().item(),
            "objective/non_score_reward": non_score.mean().item(),
            "objective/rlhf_reward": (ro.scores + non_score).mean().item(),
            "val/response_length": m.sum(1).float().mean().item(),
            "num_eos": float(ro.ended.sum()),
            "tokens": float(m.sum()),
            **upd,
            **timing,
        })
        _, var_returns = masked_mean_var(acc, ro.returns, m)
        _, var_residual = masked_mean_var(acc, ro.returns - ro.values, m)
        done = step + 1
        row = {
            **{k: g[k] for k in ("objective/scores", "objective/kl", "objective/entropy",
                                 "objective/non_score_reward", "objective/rlhf_reward")},
            **{k: g[k] for k in upd},
            "val/explained_variance": explained_variance(ro.values, ro.returns, m, var_returns=var_returns,
                                                         var_residual=var_residual).item(),
            "val/num_eos": round(g["num_eos"] * self.world),
            "val/response_length": g["val/response_length"],
            "kl_coef": self.kl_ctl.coef,
            "lr": lr,
            "episodes": done * cfg.rollout_batch_size,
            **{k: g[k] for k in timing},
            "tokens_per_second": g["tokens"] * self.world / max(g["time/generation"], 1e-9),
        }
        row["skipped_steps"] = self.guard.skipped
        self.kl_ctl.update(row["objective/kl"], cfg.rollout_batch_size)  # the same global KL on every process
        if done % cfg.logging_steps == 0 or done == total:
            metrics.log(done, row)
        self.last_row = row
        if acc.is_main_process and (done % cfg.sample_every == 0 or done == 1 or done == total):
            self.log_samples(metrics, samples_path, done, ro)
        bar.set_postfix({"score": f"{row['objective/scores']:.3f}", "kl": f"{row['objective/kl']:.2f}",
                         "s/it": f"{time.perf_counter() - t_start:.1f}"})
        bar.update(1)
        if ((cfg.save_steps and done % cfg.save_steps == 0) or done == total) and self.guard.in_a_row == 0:
            self.last_good = str(self.save_checkpoint(ckpts, done))

    def log_samples(self, metrics: MetricsLogger, path: Path, step: int, ro: Rollout, n: int = 4) -> None:
        rows = [{"step": step, "prompt": ro.prompts[i], "completion": ro.completions[i],
                 "score": round(ro.scores[i].item(), 4)} for i in range(min(n, len(ro.prompts)))]
        with path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        table = "\n\n".join(f"**{r['score']}** | {r['prompt'][-200:]} → {r['completion']}" for r in rows)
        metrics.log_text(step, "samples", table)

    def save_checkpoint(self, ckpts: CheckpointManager, step: int) -> Path:
        """Written by the main process (DDP keeps every copy identical); every process waits until it exists."""
        acc = self.accelerator
        acc.wait_for_everyone()
        path = ckpts.root / f"{PREFIX}{step:07d}"
        policy, policy_opt = training_state(self.policy, inner_optimizer(self.p_opt))  # collectives under FSDP
        value, value_opt = training_state(self.value, inner_optimizer(self.v_opt))
        if acc.is_main_process:
            path = ckpts.save(step, {
                "policy": policy,
                "value": value,
                "policy_optimizer": policy_opt,
                "value_optimizer": value_opt,
                "policy_scheduler": self.p_sched.state_dict(),
                "value_scheduler": self.v_sched.state_dict(),
                "rng": rng_state(),
            }, {"total_steps": self.cfg.total_steps, "kl_controller": self.kl_ctl.state_dict(),
                "skipped_steps": self.guard.skipped})
        acc.wait_for_everyone()
        return path

    def save_final(self, out: Path) -> None:
        """``final/`` (the policy; adapter with LoRA, plus ``final-merged/`` with --merge-lora) and ``value/`` (the
        value model), Hugging Face format. Every process calls it (under FSDP the weights are gathered)."""
        save_final_model(self.accelerator, out / "final", self.policy, self.tokenizer, merged=self.cfg.merge_lora)
        save_final_model(self.accelerator, out / "value", self.value, self.tokenizer)
