"""TRL 1.16 GRPO side of the race (``trl.GRPOTrainer``; run with ``.bench/trl-1.16/bin/python``).

Matches prefalign's `prefalign rl --estimator grpo` run (`bench.run_prefalign.grpo_config`): the default model
(fp32 weights) as policy and, since beta > 0, as frozen reference; the packaged movie-review prefixes as plain-text
prompts in file order; K = 4 completions per prompt, 2 prompts (8 completions) per optimizer step; 40 new
tokens at temperature 0.7 over the full vocabulary (top-k 0, top-p 1); reward `bench.common.length_reward`;
group-normalised advantages (``scale_rewards="group"``); the clipped surrogate (epsilon 0.2, one iteration per
generation, so the ratio is 1 at sampling time) plus beta 0.05 x the k3 KL per token, aggregated per sequence
(``loss_type="grpo"``, prefalign ``--loss-agg seq_mean_token_mean --kl-in-loss``); AdamW lr 1e-6, linear schedule,
no warmup, gradient clipping 1.0. No vLLM on either side: TRL generates with ``model.generate``, prefalign with
its decode loop.

Settings that differ from TRL 1.16's defaults, and why:
- ``loss_type="grpo"`` (default ``"dapo"``): the race's aggregation, one mean per completion;
- ``beta=0.05`` (default 0, no reference): the race keeps GRPO's KL term, as prefalign's run does;
- ``use_bias_correction_kl=False`` (default True: the k3 term times the differentiable ratio): prefalign adds
  the plain k3 term (Shao et al. 2024); equal at the first step, different gradients after;
- ``num_generations=4`` (default 8), ``max_completion_length=40`` (default 512), ``temperature=0.7`` (default 1):
  the race's config;
- ``shuffle_dataset=False``: the same prompts per step as prefalign's runner (file order);
- ``gradient_checkpointing=False``, ``bf16`` from ``--precision``, ``save_strategy="no"``, ``report_to="none"``:
  as the other TRL runners.

``--replay ROLLOUTS_JSON`` (the same-math check, fp32): the completions prefalign sampled (its runner's
``rollouts.json``) replace TRL's sampling, step by step; everything after sampling (decoding, the reward call,
advantages, reference log-probs, loss, backward, clipping, AdamW) is TRL's own. Time split: ``generation``
(``_generate_single_turn``), ``scoring`` (``_calculate_rewards``), ``logprobs`` (the rest of
``_generate_and_score_completions``: tokenising, padding, the reference forward), ``update`` (from there to the
step's end: the loss forward, backward and optimizer step).
"""

from __future__ import annotations

import sys
from pathlib import Path

# the repo root replaces this script's own folder on the path: bench/*.py must not shadow stdlib modules
sys.path[0] = str(Path(__file__).resolve().parent.parent)
from bench.common import (  # noqa: E402
    HPARAMS,
    StepClock,
    emit,
    length_reward,
    load_prefixes,
    load_rollouts,
    model_path,
    now,
    parse_args,
    quiet,
    setup_process,
    trl_training_args,
)


def grpo_config(args):
    from trl import GRPOConfig

    kw = dict(
        output_dir=str(Path(args.work) / "out"),
        per_device_train_batch_size=HPARAMS["batch_size"],
        gradient_accumulation_steps=1,
        num_generations=HPARAMS["num_generations"],
        max_completion_length=HPARAMS["max_new_tokens"],
        temperature=HPARAMS["temperature"],
        top_k=0,
        top_p=1.0,
        num_iterations=1,
        epsilon=0.2,
        beta=HPARAMS["kl_coef"],
        use_bias_correction_kl=False,
        loss_type="grpo",
        scale_rewards="group",
        shuffle_dataset=False,
        learning_rate=HPARAMS["lr_grpo"],
        max_steps=args.steps,
        **trl_training_args(args.precision, args.device),
    )
    return GRPOConfig(**{**kw, **args.overrides})


class Probe:
    """What the runner measures around TRL's methods: step times and their split, tokens, first-step figures."""

    def __init__(self, replay: list[dict] | None, device: str = "cpu"):
        self.device = device
        self.clock = StepClock(device)
        self.replay = replay
        self.split = {"generation": [], "logprobs": [], "scoring": [], "update": []}
        self.cur = {"generation": 0.0, "scoring": 0.0, "prepare": 0.0, "prepared_at": None}
        self.tokens: list[int] = []
        self.response_tokens: list[int] = []
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.first_logp: float | None = None
        self.first_logs: dict[str, list[float]] = {}
        self.mismatches = 0
        self.trainer = None

    def wrap(self, trainer) -> None:
        """Time and record TRL's own methods on this trainer instance (their results are unchanged, except that
        ``--replay`` returns the recorded completions instead of sampling)."""
        self.trainer = trainer
        generate, rewards = trainer._generate_single_turn, trainer._calculate_rewards
        prepare, logps = trainer._generate_and_score_completions, trainer._get_per_token_logps_and_entropies

        def timed_generation(prompt_ids, *a, **k):
            t = now(self.device)
            if self.replay is None:
                completion_ids, sampled_logps = generate(prompt_ids, *a, **k)
            else:  # the same-math check: prefalign's completions for this step, after checking the prompts
                step = self.replay[len(self.tokens)]
                self.mismatches += sum(list(p) != q for p, q in zip(prompt_ids, step["prompt_ids"]))
                completion_ids, sampled_logps = [list(c) for c in step["completion_ids"]], None
            self.cur["generation"] += now(self.device) - t
            self.response_tokens.append(sum(len(c) for c in completion_ids))
            self.tokens.append(sum(len(p) for p in prompt_ids) + self.response_tokens[-1])
            return completion_ids, sampled_logps

        def timed_rewards(*a, **k):
            t = now(self.device)
            out = rewards(*a, **k)
            self.cur["scoring"] += now(self.device) - t
            return out

        def timed_prepare(*a, **k):
            t = now(self.device)
            out = prepare(*a, **k)
            self.cur["prepared_at"] = now(self.device)
            self.cur["prepare"] += self.cur["prepared_at"] - t
            return out

        def recorded_logps(model, input_ids, attention_mask, logits_to_keep, *a, **k):
            out = logps(model, input_ids, attention_mask, logits_to_keep, *a, **k)
            import torch

            if torch.is_grad_enabled() and self.first_logp is None:  # the first loss forward: step 1's policy
                mask = attention_mask[:, -logits_to_keep:].bool()
                self.first_logp = float(out[0].detach()[mask].mean())
            return out

        trainer._generate_single_turn, trainer._calculate_rewards = timed_generation, timed_rewards
        trainer._generate_and_score_completions = timed_prepare
        trainer._get_per_token_logps_and_entropies = recorded_logps

    def step_end(self) -> None:
        self.clock.mark()
        if len(self.clock.marks) == 1:  # TRL keeps only the latest step's rows: copy the first step's now
            logs = self.trainer._logs  # in row order: logged before TRL shuffles the rows
            self.first_logs = {
                "advantages": list(logs["advantages"]),
                "rewards": list(logs["rewards"]["length_reward"]),
            }
        c = self.cur
        self.split["generation"].append(c["generation"])
        self.split["scoring"].append(c["scoring"])
        self.split["logprobs"].append(c["prepare"] - c["generation"] - c["scoring"])
        self.split["update"].append(self.clock.marks[-1] - c["prepared_at"])
        self.cur.update(generation=0.0, scoring=0.0, prepare=0.0, prepared_at=None)


def main(argv=None) -> None:
    quiet()
    args = parse_args(argv)
    setup_process(args.threads, args.device)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    path = model_path(args.data)
    tok = AutoTokenizer.from_pretrained(path)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    train = Dataset.from_dict({"prompt": load_prefixes(args.data)})
    probe = Probe(load_rollouts(args.replay) if args.replay else None, args.device)

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            probe.clock.start()

        def on_step_end(self, *a, **k):
            probe.step_end()

        def on_log(self, args_, state, control, logs=None, **k):
            if logs and "grad_norm" in logs:
                probe.grad_norms.append(float(logs["grad_norm"]))

    class Recording(GRPOTrainer):
        def compute_loss(self, model, inputs, *a, **k):
            out = super().compute_loss(model, inputs, *a, **k)
            if model.training:
                probe.losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))
            return out

    trainer = Recording(
        model=policy,
        reward_funcs=length_reward,
        args=grpo_config(args),
        train_dataset=train,
        processing_class=tok,
        callbacks=[Clock()],
    )
    probe.wrap(trainer)
    trainer.train()
    emit(
        {
            "side": "trl",
            "workload": "grpo",
            "precision": args.precision,
            "step_seconds": probe.clock.seconds(),
            "losses": probe.losses,
            "items_per_step": HPARAMS["batch_size"],
            "tokens": probe.tokens,
            "replay": args.replay is not None,
            "extra": extras(trainer, probe),
        },
        args.device,
    )


def extras(trainer, probe: Probe) -> dict:
    """First-step figures for the same-math check, the time split, and with ``--replay`` how far TRL's first-step
    advantages and rewards are from prefalign's on the same completions."""
    advantages, rewards = probe.first_logs["advantages"], probe.first_logs["rewards"]
    out = {
        "split": probe.split,
        "response_tokens": probe.response_tokens,
        "first_logps": [probe.first_logp],
        "first_grad_norm": probe.grad_norms[0] if probe.grad_norms else None,
        "grad_norms": probe.grad_norms,
        "first_advantages": advantages,
        "first_rewards": rewards,
        "eos_token_ids": list(trainer.eos_token_ids),
        "mixed_precision": trainer.accelerator.mixed_precision,
    }
    if probe.replay:
        first = probe.replay[0]
        out.update(
            token_mismatches=probe.mismatches,
            advantage_max_diff=max(abs(a - b) for a, b in zip(advantages, first["advantages"])),
            reward_max_diff=max(abs(a - b) for a, b in zip(rewards, first["rewards"])),
        )
    return out


if __name__ == "__main__":
    main()
