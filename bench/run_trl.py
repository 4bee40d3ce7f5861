"""TRL 1.16 side of the race for dpo, dpo_lora and reward (run with ``.bench/trl-1.16/bin/python``).

Same model directory, same pairs file (explicit prompt/chosen/rejected text, which TRL tokenises
itself; the runner asserts it gets the ids prefalign gets), same hyperparameters. Settings that differ
from TRL's defaults, and why:
- ``gradient_checkpointing=False``: TRL's configs default to True, prefalign's to False; the race runs
  both without it (same config).
- ``bf16`` set from ``--precision`` (TRL defaults to bf16 on).
- ``train_sampling_strategy="sequential"``: the same batches as prefalign's runner, in file order.
- ``save_strategy="no"``, ``report_to="none"``: nothing written during the race.
- ``use_cpu`` unless ``--device cuda``: the CPU race hides the GPU from its children anyway; this says it.
Step times: a callback marks ``on_train_begin`` and every ``on_step_end``.
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
    load_pairs,
    model_path,
    pair_tokens_per_step,
    parse_args,
    quiet,
    setup_process,
    trl_training_args,
)


def main(argv=None) -> None:
    quiet()
    args = parse_args(argv)
    setup_process(args.threads, args.device)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    kind = args.workload
    pairs = load_pairs(args.data)
    n = HPARAMS["batch_size"]
    ds = Dataset.from_list(
        [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in pairs[: args.steps * n]]
    )
    clock = StepClock(args.device)

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock.start()

        def on_step_end(self, *a, **k):
            clock.mark()

    common = dict(
        output_dir=str(Path(args.work) / "out"),
        per_device_train_batch_size=n,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        train_sampling_strategy="sequential",
        max_length=HPARAMS["max_length"],
        **trl_training_args(args.precision, args.device),
    )
    common.update(args.overrides)  # what-if experiments only
    losses: list[float] = []
    extra: dict = {}
    if kind == "reward":
        from trl import RewardConfig, RewardTrainer

        rm_dir = str(Path(args.data) / "rm-init")
        tok = AutoTokenizer.from_pretrained(rm_dir)
        model = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1, dtype=torch.float32)
        cfg = RewardConfig(learning_rate=HPARAMS["lr_reward"], **common)

        class Recording(RewardTrainer):
            def compute_loss(self, model, inputs, *a, **k):
                out = super().compute_loss(model, inputs, *a, **k)
                if model.training:
                    losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))
                return out

        trainer = Recording(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
        got = [(r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset]
        want = [(p[0] + p[1], p[0] + p[2]) for p in (r["ids"] for r in pairs[: len(got)])]
    else:
        from peft import LoraConfig
        from trl import DPOConfig, DPOTrainer

        lora = kind == "dpo_lora"
        path = model_path(args.data)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        cfg = DPOConfig(
            learning_rate=HPARAMS["lr_dpo_lora" if lora else "lr_dpo"],
            beta=HPARAMS["beta"],
            loss_type=["sigmoid"],
            **common,
        )
        peft = (
            LoraConfig(
                r=HPARAMS["lora_r"],
                lora_alpha=HPARAMS["lora_alpha"],
                lora_dropout=0.0,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            )
            if lora
            else None
        )

        class Recording(DPOTrainer):
            def compute_loss(self, model, inputs, *a, **k):
                out = super().compute_loss(model, inputs, *a, **k)
                if model.training:
                    losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))
                    if len(losses) == 1:
                        extra["first_logps_chosen"] = self._metrics["train"]["logps/chosen"][-1]
                        extra["first_logps_rejected"] = self._metrics["train"]["logps/rejected"][-1]
                return out

        trainer = Recording(
            model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft, callbacks=[Clock()]
        )
        got = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset]
        want = [tuple(r["ids"]) for r in pairs[: len(got)]]
    extra["token_mismatches"] = sum(g != w for g, w in zip(got, want)) + abs(len(got) - args.steps * n)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    emit(
        {
            "side": "trl",
            "workload": kind,
            "precision": args.precision,
            "step_seconds": clock.seconds(),
            "losses": losses,
            "items_per_step": n,
            "tokens": pair_tokens_per_step(pairs, n, args.steps),
            "extra": extra,
            "trainable_params": trainable,
        },
        args.device,
    )


if __name__ == "__main__":
    main()
