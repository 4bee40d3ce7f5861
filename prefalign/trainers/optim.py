"""AdamW and its learning-rate schedule, the same for every trainable model of every trainer."""

from __future__ import annotations

import math

import torch

from prefalign.trainers.backend import param_ndim


def lr_lambda(kind: str, warmup: int, total: int):
    """The LR multiplier at optimizer step ``step``: linear warmup, then constant, linear or cosine to 0."""

    def multiplier(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)  # never exactly 0: the first step must move the weights
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return multiplier


def make_optimizer(model, cfg, learning_rate: float, total_steps: int):
    """``(optimizer, lr_scheduler)``: AdamW over the trainable parameters (no decay on biases and norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    ndim = {id(p): param_ndim(p) for p in params}
    groups = [
        {"params": [p for p in params if ndim[id(p)] >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if ndim[id(p)] < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]  # LoRA has no 1-D weights; DeepSpeed drops empty groups
    # the fused kernel steps all tensors at once, far faster than the per-tensor loop on CPU (BENCHMARKS.md)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=tuple(cfg.adam_betas), fused=fused or None)
    multiplier = lr_lambda(cfg.lr_scheduler, cfg.warmup_steps, total_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def realign_lr(scheduler) -> None:
    """After a resume, set each parameter group's learning rate from the rebuilt schedule at the restored step.

    The optimizer's state (optimizer.pt) holds the rate the saved run's schedule gave its next step; a run resumed
    with a longer --max-steps rebuilds the schedule for its new length, which LambdaLR applies only from its next
    ``step()``, so the first step after the resume would take the old rate. Same length: the same rate, bit for
    bit (LambdaLR computes ``base_lr * lambda(last_epoch)`` too). ``scheduler``: `make_optimizer`'s LambdaLR (the
    backends prepare only the model and optimizer, so no wrapper holds it)."""
    groups = scheduler.optimizer.param_groups
    for group, base, multiplier in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * multiplier(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]
