"""TRL 1.12 PPO side of the race (``trl.experimental.ppo``; run with ``.bench/trl-1.12/bin/python``).

Matches prefalign's PPO run: rollout batch 8, 40 new tokens, temperature 0.7, 1 PPO epoch, 1 minibatch,
k1 KL penalty 0.05, lr 3e-6; policy and a frozen reference from the default model; reward model and
value-model init both from ``rm-init`` (as prefalign does when the reward is a reward model).
Settings that differ from TRL 1.12's defaults, and why:
- ``stop_token="eos"``: prefalign cuts responses at the first EOS (TRL's default never stops early);
- ``local_rollout_forward_batch_size=8``: one forward chunk = the rollout batch (as prefalign);
- ``num_sample_generations=0``: TRL would otherwise generate on an eval set during training;
- bf16: this trainer builds its ``Accelerator`` without the config's precision, so for the bf16 race
  the orchestrator sets ``ACCELERATE_MIXED_PRECISION=bf16`` (else ``bf16=True`` runs fp32 on CPU).
Time split: the module's ``batch_generation`` (generation), ``get_reward`` with the reward model
(scoring), and everything from the first forward with gradients to the step's end (update).
"""

from __future__ import annotations

import sys
from pathlib import Path

# the repo root replaces this script's own folder on the path: bench/*.py must not shadow stdlib modules
sys.path[0] = str(Path(__file__).resolve().parent.parent)
from bench.common import HPARAMS, StepClock, emit, load_prefixes, model_path, now, parse_args, quiet, setup_process  # noqa: E402


def main(argv=None) -> None:
    quiet()
    args = parse_args(argv)
    setup_process(args.threads, args.device)
    import torch
    import trl.experimental.ppo.ppo_trainer as pt
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    path, rm_dir = model_path(args.data), str(Path(args.data) / "rm-init")
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    n = HPARAMS["batch_size"]
    prompts = [tok(p, add_special_tokens=False)["input_ids"][-128:] for p in load_prefixes(args.data)]
    train = Dataset.from_dict({"input_ids": prompts})
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1, dtype=torch.float32)
    cfg = PPOConfig(
        output_dir=str(Path(args.work) / "out"),
        per_device_train_batch_size=n,
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        num_ppo_epochs=1,
        total_episodes=args.steps * n,
        response_length=HPARAMS["max_new_tokens"],
        temperature=HPARAMS["temperature"],
        kl_coef=HPARAMS["kl_coef"],
        kl_estimator="k1",
        learning_rate=HPARAMS["lr_ppo"],
        lr_scheduler_type="linear",
        stop_token="eos",
        local_rollout_forward_batch_size=n,
        num_sample_generations=0,
        bf16=args.precision == "bf16",
        gradient_checkpointing=False,
        use_cpu=args.device == "cpu",
        report_to="none",
        save_strategy="no",
        seed=HPARAMS["seed"],
        logging_steps=1,
        disable_tqdm=True,
    )

    clock = StepClock(args.device)
    split = {"generation": [], "scoring": [], "update": []}
    cur = {"generation": 0.0, "scoring": 0.0, "update_start": None}
    tokens, resp_tokens = [], []

    def timed_generation(*a, **k):
        t = now(args.device)
        out = orig_batch_generation(*a, **k)
        cur["generation"] += now(args.device) - t
        qr, queries = out[0], a[1]
        ctx = queries.shape[1]
        real_q = int((queries != tok.pad_token_id).sum())
        resp = qr[:, ctx:]
        is_eos = resp == tok.eos_token_id
        before = torch.cumsum(is_eos.long(), 1) - is_eos.long()
        r = int((before == 0).sum())
        tokens.append(real_q + r)
        resp_tokens.append(r)
        return out

    def timed_reward(model, *a, **k):
        t = now(args.device)
        out = orig_get_reward(model, *a, **k)
        if model is trainer.reward_model:
            cur["scoring"] += now(args.device) - t
        return out

    def timed_forward(model, *a, **k):
        if torch.is_grad_enabled() and cur["update_start"] is None:
            cur["update_start"] = now(args.device)
        return orig_forward(model, *a, **k)

    orig_batch_generation, orig_get_reward, orig_forward = pt.batch_generation, pt.get_reward, pt.forward
    pt.batch_generation, pt.get_reward, pt.forward = timed_generation, timed_reward, timed_forward

    losses = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock.start()

        def on_log(self, args_, state, control, logs=None, **k):
            if logs and "loss/policy_avg" in logs:
                losses.append(float(logs["loss/policy_avg"]))

        def on_step_end(self, *a, **k):
            clock.mark()
            split["generation"].append(cur["generation"])
            split["scoring"].append(cur["scoring"])
            split["update"].append(clock.marks[-1] - cur["update_start"])
            cur.update(generation=0.0, scoring=0.0, update_start=None)

    trainer = PPOTrainer(
        args=cfg,
        processing_class=tok,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        train_dataset=train,
        value_model=value,
        eval_dataset=train.select(range(n)),
        callbacks=[Clock()],
    )
    trainer.train()
    emit(
        {
            "side": "trl",
            "workload": "ppo",
            "precision": args.precision,
            "step_seconds": clock.seconds(),
            "losses": losses,
            "items_per_step": n,
            "tokens": tokens,
            "extra": {
                "split": split,
                "response_tokens": resp_tokens,
                "mixed_precision": trainer.accelerator.mixed_precision,
            },
        },
        args.device,
    )


if __name__ == "__main__":
    main()
