"""LoRA via peft; with an adapter, the reference policy is the same weights with the adapter off."""

from __future__ import annotations

import contextlib
from pathlib import Path

from prefalign.trainers.config import CommonConfig


def apply_lora(model, cfg: CommonConfig, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None):
    """Wrap ``model`` with LoRA adapters (cfg.lora_r > 0); only adapter (and ``modules_to_save``) weights train."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_target_modules
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,  # type: ignore[arg-type]  # peft annotates int; a float scales as alpha / r
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        task_type=task_type,
        modules_to_save=modules_to_save,
    )
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as e:
        from prefalign.errors import UserError

        raise UserError(f"--lora-target-modules {' '.join(targets)}: {e}") from None
    # peft records the base as the model was named: a relative directory would load only from this working
    # directory (and one with a slash would read as a hub id from anywhere else)
    base = peft_model.peft_config["default"].base_model_name_or_path
    if base and Path(base).is_dir():
        peft_model.peft_config["default"].base_model_name_or_path = str(Path(base).resolve())
    return peft_model


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def adapter_off(model):
    """Context where a peft model runs as its base model (the reference); a no-op for plain models."""
    return model.disable_adapter() if is_peft(model) else contextlib.nullcontext()
