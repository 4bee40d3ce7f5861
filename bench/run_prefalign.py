"""prefalign side of the race, through its Python API (run with the project venv).

    .venv/bin/python bench/run_prefalign.py --workload dpo --precision fp32 --steps 4 --data .bench/data --work /tmp/w

Harness-only subclasses, no change to what a step computes:
- ``batch_for`` reads pairs in file order (TRL's ``train_sampling_strategy="sequential"``), so both
  sides train on the same batches;
- ``save_checkpoint`` / ``save_final`` are no-ops: TRL runs with ``save_strategy="no"``, and writing
  ~2 GB of checkpoint after the last step is not the race;
- grpo: ``prompt_batch`` reads the prompts in file order (TRL's ``shuffle_dataset=False``), and ``rollout``
  also records what each step sampled (``rollouts.json``, for TRL's same-math ``--replay``).
Step times come from ``metrics.jsonl`` (``wall_seconds`` of consecutive rows, logging every step). prefalign
puts its models on the GPU by itself when one is visible (accelerate's device); with ``--device cuda`` each step
also ends with a synchronize (`_synced`), so the row's host clock counts the step's kernels, and the rollout
workloads move their model and batches to the GPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# the repo root replaces this script's own folder on the path: bench/*.py must not shadow stdlib modules
sys.path[0] = str(Path(__file__).resolve().parent.parent)
from bench.common import (  # noqa: E402
    HPARAMS,
    emit,
    load_pairs,
    load_prefixes,
    now,
    pair_tokens_per_step,
    parse_args,
    prefalign_model,
    quiet,
    save_rollouts,
    setup_process,
    sync,
)


def _sequential(cls):
    class Sequential(cls):
        def batch_for(self, step, micro):
            s = self.sizes
            start = (step * s.grad_accum + micro) * s.micro_batch
            return self.train_data[start : start + s.micro_batch]

        def save_checkpoint(self, step):
            return None

        def save_final(self, path):
            pass

    return Sequential


def _synced(cls, device: str):
    """``cls`` whose every step ends once ``device`` has run it: metrics.jsonl's host clock is read right after the
    step, and CUDA kernels run asynchronously. The class itself on the CPU (the CPU race unchanged)."""
    if device == "cpu":
        return cls

    class Synced(cls):
        def train_step(self, step):
            out = super().train_step(step)
            sync(device)
            return out

    return Synced


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r or "objective/scores" in r]


def _step_seconds(rows: list[dict]) -> list[float]:
    walls = [r["wall_seconds"] for r in rows]
    return [b - a for a, b in zip([0.0] + walls, walls)]


def run_pairs(args, kind: str) -> dict:
    pairs = load_pairs(args.data)
    out = Path(args.work) / "out"
    common = dict(
        data=str(Path(args.data) / "pairs.jsonl"),
        output=str(out),
        overwrite=True,
        max_length=HPARAMS["max_length"],
        batch_size=HPARAMS["batch_size"],
        grad_accum=1,
        max_steps=args.steps,
        precision=args.precision,
        seed=HPARAMS["seed"],
        logging_steps=1,
        lr_scheduler="linear",
        warmup_steps=0,
        max_grad_norm=HPARAMS["max_grad_norm"],
    )
    if kind == "reward":
        from prefalign.trainers.reward import RewardConfig, RewardTrainer

        cfg = RewardConfig(
            model=str(Path(args.data) / "rm-init"), learning_rate=HPARAMS["lr_reward"], **{**common, **args.overrides}
        )
        trainer = _synced(_sequential(RewardTrainer), args.device)(cfg)
    else:
        from prefalign.trainers.dpo import DPOConfig, DPOTrainer

        lora = kind == "dpo_lora"
        cfg = DPOConfig(
            beta=HPARAMS["beta"],
            loss_type="sigmoid",
            learning_rate=HPARAMS["lr_dpo_lora" if lora else "lr_dpo"],
            lora_r=HPARAMS["lora_r"] if lora else 0,
            **({"lora_alpha": HPARAMS["lora_alpha"]} if lora else {}),  # a full run refuses LoRA's options
            **{**common, **prefalign_model(args.data), **args.overrides},
        )
        trainer = _synced(_sequential(DPOTrainer), args.device)(cfg)
    trainer.train()
    rows = _rows(out)
    n = HPARAMS["batch_size"]
    # the same pairs, in the same order, that TRL tokenises itself: checked on the batches we ran
    seen = [item for _, item in trainer.train_data[: args.steps * n]]
    mismatched = sum((p.prompt_ids, p.chosen_ids, p.rejected_ids) != tuple(r["ids"]) for p, r in zip(seen, pairs))
    extra = {"token_mismatches": mismatched}
    if kind != "reward":
        extra["first_logps_chosen"] = rows[0]["logps/chosen"]
        extra["first_logps_rejected"] = rows[0]["logps/rejected"]
    return {
        "step_seconds": _step_seconds(rows),
        "losses": [r["loss"] for r in rows],
        "items_per_step": n,
        "tokens": pair_tokens_per_step(pairs, n, args.steps),
        "extra": extra,
        "trainable_params": _run_json(out).get("trainable_parameters"),
    }


def _run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def run_ppo(args) -> dict:
    from prefalign.trainers.ppo import PPOConfig, PPOTrainer

    out = Path(args.work) / "out"
    kw = dict(
        prompts=str(Path(args.data) / "prefixes.txt"),
        reward=str(Path(args.data) / "rm-init"),
        output=str(out),
        overwrite=True,
        rollout_batch_size=HPARAMS["batch_size"],
        max_new_tokens=HPARAMS["max_new_tokens"],
        temperature=HPARAMS["temperature"],
        ppo_epochs=1,
        num_minibatches=1,
        grad_accum=1,
        max_steps=args.steps,
        kl_coef=HPARAMS["kl_coef"],
        learning_rate=HPARAMS["lr_ppo"],
        precision=args.precision,
        seed=HPARAMS["seed"],
        logging_steps=1,
        sample_every=10**6,
        max_grad_norm=HPARAMS["max_grad_norm"],
    )
    cfg = PPOConfig(**{**kw, **prefalign_model(args.data), **args.overrides})

    class NoSave(PPOTrainer):
        def save_checkpoint(self, step):
            return None

        def save_final(self, out):
            pass

        def rollout(self, idx, step, timing):
            ro = super().rollout(idx, step, timing)
            self._tokens.append(int(ro.attention_mask.sum()))
            self._resp.append(int(ro.response_mask.sum()))
            return ro

    trainer = _synced(NoSave, args.device)(cfg)
    trainer._tokens, trainer._resp = [], []
    trainer.train()
    rows = _rows(out)
    split = {k: [r[f"time/{k}"] for r in rows] for k in ("generation", "logprobs", "scoring", "update")}
    return {
        "step_seconds": _step_seconds(rows),
        "losses": [r["loss/policy"] for r in rows],
        "items_per_step": HPARAMS["batch_size"],
        "tokens": trainer._tokens,
        "extra": {"split": split, "response_tokens": trainer._resp},
    }


def grpo_config(args, out: Path):
    """prefalign's side of the grpo race: `prefalign rl --estimator grpo` at the config of `bench.run_trl_grpo`."""
    from prefalign.trainers.rl import RLConfig

    k = HPARAMS["num_generations"]
    kw = dict(
        prompts=str(Path(args.data) / "prefixes.txt"),
        reward=["bench.common:length_reward"],
        output=str(out),
        overwrite=True,
        estimator="grpo",
        loss_agg="seq_mean_token_mean",
        num_generations=k,
        rollout_batch_size=HPARAMS["batch_size"] // k,
        max_new_tokens=HPARAMS["max_new_tokens"],
        temperature=HPARAMS["temperature"],
        top_k=0,
        top_p=1.0,
        ppo_epochs=1,
        num_minibatches=1,
        grad_accum=1,
        clip_eps=0.2,
        kl_in_loss=True,
        kl_coef=HPARAMS["kl_coef"],
        learning_rate=HPARAMS["lr_grpo"],
        lr_scheduler="linear",
        warmup_steps=0,
        max_steps=args.steps,
        precision=args.precision,
        seed=HPARAMS["seed"],
        logging_steps=1,
        sample_every=10**6,
        max_grad_norm=HPARAMS["max_grad_norm"],
    )
    return RLConfig(**{**kw, **prefalign_model(args.data), **args.overrides})


def run_grpo(args) -> dict:
    from prefalign.trainers.rl import RLTrainer

    out = Path(args.work) / "out"
    cfg = grpo_config(args, out)
    recorded: list[dict] = []

    class Recording(RLTrainer):
        def prompt_batch(self, step):
            b = self.cfg.rollout_batch_size
            return list(range(step * b, (step + 1) * b))

        def save_checkpoint(self, step):
            return None

        def save_final(self, out):
            pass

        def rollout(self, idx, step, timing):
            ro = super().rollout(idx, step, timing)
            recorded.append(_record(self, ro, idx))
            return ro

    _synced(Recording, args.device)(cfg).train()
    rows = _rows(out)
    save_rollouts(Path(args.work) / "rollouts.json", recorded)
    split = {k: [r[f"time/{k}"] for r in rows] for k in ("generation", "logprobs", "scoring", "update")}
    first = recorded[0]
    extra = {
        "split": split,
        "response_tokens": [r["response_tokens"] for r in recorded],
        "first_logps": [first["mean_logp"]],
        "first_grad_norm": rows[0]["policy/grad_norm"],
        "grad_norms": [r["policy/grad_norm"] for r in rows],
        "first_advantages": first["advantages"],
        "first_rewards": first["rewards"],
    }
    # the loss TRL logs: the policy term plus beta x the k3 term (prefalign logs the two apart)
    losses = [r["loss/policy"] + cfg.kl_coef * r["loss/kl"] for r in rows]
    return {
        "step_seconds": _step_seconds(rows),
        "losses": losses,
        "items_per_step": cfg.completions_per_iteration,
        "tokens": [r["tokens"] for r in recorded],
        "extra": extra,
    }


def _record(trainer, ro, idx: list[int]) -> dict:
    """One grpo step as `bench.common.save_rollouts` stores it, with its first-step check figures."""
    k = trainer.cfg.num_generations
    mask = ro.response_mask.bool()  # (B, R); P = the prompt width
    width = ro.query_response.shape[1] - mask.shape[1]
    responses = ro.query_response[:, width:]
    return {
        "prompt_ids": [trainer.prompt_ids[i] for i in idx for _ in range(k)],
        "completion_ids": [r[m].tolist() for r, m in zip(responses, mask)],
        "rewards": ro.scores.tolist(),
        "advantages": ro.advantages[:, 0].tolist(),
        "mean_logp": float(ro.logps[mask].mean()),
        "tokens": int(ro.attention_mask.sum()),
        "response_tokens": int(mask.sum()),
    }


def run_rollout(args, batch: int) -> dict:
    import torch

    from prefalign.data import PromptCollator, tokenize_prompts
    from prefalign.models import load_causal_lm, load_tokenizer
    from prefalign.rollout import SamplingConfig, eos_token_ids, generate, sampling_copy
    from prefalign.rollout.generate import key_seed

    name = prefalign_model(args.data).get("model")  # None: the embedded default
    tok = load_tokenizer(name)
    model = load_causal_lm(name).to(args.device).eval()
    prefixes = load_prefixes(args.data)
    ids = tokenize_prompts(prefixes, tok, 128)
    sampling = SamplingConfig(max_new_tokens=HPARAMS["max_new_tokens"], temperature=HPARAMS["temperature"])
    eos = eos_token_ids(model, tok)
    # prefalign's rollout path (PPO, prefs, eval): under bf16 a bf16 copy of the weights, keyed sampling
    sampler = sampling_copy(model, torch.bfloat16) if args.precision == "bf16" else model
    collate = PromptCollator(tok.pad_token_id)
    secs, toks = [], []
    for b in range(args.steps):
        batch_ids = {k: v.to(args.device) for k, v in collate(ids[b * batch : (b + 1) * batch]).items()}
        torch.manual_seed(HPARAMS["seed"] + b)
        t = now(args.device)
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            gen = generate(
                sampler,
                batch_ids["input_ids"],
                batch_ids["attention_mask"],
                sampling,
                eos_ids=eos,
                pad_id=tok.pad_token_id,
                row_keys=[key_seed(b, i) for i in range(batch)],
                seed=HPARAMS["seed"],
            )
        secs.append(now(args.device) - t)
        toks.append(int(gen.response_mask.sum()))
    # the decoder is prefalign's default (the loop since issue 13; model.generate before): recorded with the run
    return {"step_seconds": secs, "items_per_step": batch, "tokens": toks, "extra": {"decoder": sampling.decoder}}


def _use_fused_adamw() -> None:
    """prefalign builds torch.optim.AdamW with its defaults: on CPU that is the per-tensor for-loop; this patches
    both trainers' make_optimizer to the fused kernel."""
    import torch

    import prefalign.trainers.loop as loop
    import prefalign.trainers.ppo as ppo

    original = loop.make_optimizer  # the one in prefalign.trainers.optim, as both trainers import it

    def fused(model, cfg, learning_rate, total_steps):
        optimizer, scheduler = original(model, cfg, learning_rate, total_steps)
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
        fused_opt = torch.optim.AdamW(groups, lr=learning_rate, betas=tuple(cfg.adam_betas), fused=True)
        sched = type(scheduler)(fused_opt, scheduler.lr_lambdas[0])
        return fused_opt, sched

    loop.make_optimizer = ppo.make_optimizer = fused


def _chunks_in_data_order() -> None:
    """Forward chunks filled in the micro-batch's data order, as before they went longest first."""
    from prefalign.trainers import loop

    loop.Trainer.longest_first = lambda self, examples: examples


def _keep_sampling_copy() -> None:
    """The bf16 sampling copy keeps its weights through the update, as before `release_sampling_copy`."""
    import prefalign.trainers.ppo as ppo

    ppo.release_sampling_copy = lambda copy_model, model: None


def _dense_embedding_backward() -> None:
    """The input embedding's backward dense again (a zero-filled table-sized gradient per backward, freed after
    each step), as before `sparse_embedding_backward`."""
    import prefalign.trainers.backend as backend

    backend.sparse_embedding_backward = lambda model: []


def _joint_ppo_step() -> None:
    """PPO's two models stepped together after both backwards, as before the policy stepped first (its gradients
    alive through the value model's forward and backward)."""
    from prefalign.trainers.guard import NonFiniteGuard
    from prefalign.trainers.ppo_update import PPOUpdate

    def minibatch_step(self, rollout, mb_idx, mb_tokens, done):
        def both(*args):
            return {**self.policy_backward(*args), **self.value_backward(*args)}

        got = self.accumulate_minibatch(rollout, mb_idx, mb_tokens, both)
        finite_losses = NonFiniteGuard.finite(got["loss/policy"], got["loss/value"])
        (norm_p, norm_v), finite = self.backend.step(self.trained, self.cfg.max_grad_norm, finite_losses)
        self.record_step(finite, done)
        return (got if finite else None), {"policy/grad_norm": norm_p, "val/grad_norm": norm_v}

    PPOUpdate.minibatch_step = minibatch_step


def _norm_outputs_kept() -> None:
    """The projections after each RMSNorm keep its output themselves, as before the lean forwards rebuilt it from
    the norm's input and rsqrt."""
    import contextlib

    import prefalign.models.lean as lean

    lean._rebuilt_from_norm_inputs = lambda y: contextlib.nullcontext()


EXPERIMENTS = {
    "fused_adamw": _use_fused_adamw,
    "chunks_in_data_order": _chunks_in_data_order,
    "keep_sampling_copy": _keep_sampling_copy,
    "dense_embedding_backward": _dense_embedding_backward,
    "joint_ppo_step": _joint_ppo_step,
    "norm_outputs_kept": _norm_outputs_kept,
}


def apply_experiments(names: list[str]) -> None:
    """What-if patches for BENCHMARKS.md's "what would move it" (never used in the race)."""
    for name in names:
        if name not in EXPERIMENTS:
            raise SystemExit(f"unknown --exp {name!r}")
        EXPERIMENTS[name]()


def main(argv=None) -> None:
    quiet()
    args = parse_args(argv)
    setup_process(args.threads, args.device)
    apply_experiments(args.exp)
    import logging

    logging.disable(logging.WARNING)
    if args.workload in ("dpo", "dpo_lora", "reward"):
        res = run_pairs(args, args.workload)
    elif args.workload == "ppo":
        res = run_ppo(args)
    elif args.workload == "grpo":
        res = run_grpo(args)
    else:
        res = run_rollout(args, int(args.workload.removeprefix("rollout")))
    emit(
        {
            "side": "prefalign",
            "workload": args.workload,
            "precision": args.precision,
            **res,
            "overrides": args.overrides,
            "experiments": args.exp,
        },
        args.device,
    )


if __name__ == "__main__":
    main()
