"""Scalar-head models (reward and value models): per-token values from a backbone + linear ``score`` head."""

from __future__ import annotations

import torch

from prefalign.errors import UserError
from prefalign.models.loading import base_model
from prefalign.models.logprobs import position_ids_from_mask


def backbone_and_score(model):
    """``(backbone, score_head)`` of a sequence-classification model, seeing through peft wrappers."""
    base = base_model(model)
    head = getattr(base, "score", None)
    if head is None:
        raise UserError(
            f"{type(base).__name__} has no linear `score` head; value models need a decoder "
            "sequence-classification model (Llama, Qwen, Mistral, GPT-2, ...)"
        )
    return base.base_model, head


def load_value_model(name_or_path: str, dtype=None, head_init_std: float | None = None):
    """A scalar-head model for values: a reward model as it is, or a causal LM with a new head.

    With ``head_init_std``, a ``score`` head the checkpoint does not hold (a causal LM's) is initialised normal
    with that std (0: zeros) instead of at the library's random default; a trained head (a reward model's) is kept.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from prefalign.models.loading import _hub_error, disable_dropout, load_tokenizer, resolve_model

    path = resolve_model(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
        config.num_labels = 1
        if config.pad_token_id is None:
            config.pad_token_id = load_tokenizer(name_or_path).pad_token_id
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, dtype=dtype or torch.float32, output_loading_info=True
        )
    except (OSError, ValueError) as e:
        raise _hub_error(name_or_path, e) from None
    new_head = any(key.split(".")[0] == "score" for key in info["missing_keys"])
    if head_init_std is not None and new_head:
        _, head = backbone_and_score(model)
        torch.nn.init.normal_(head.weight, std=head_init_std)
        if getattr(head, "bias", None) is not None:
            torch.nn.init.zeros_(head.bias)
    disable_dropout(model)
    return model


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor):
    """Value of the state before each completion token: ``(B, T)`` aligned to tokens, 0 off-completion.

    ``values[b, t] = score(hidden[b, t-1])`` where ``completion_mask[b, t]`` is 1: the critic sees the
    same context the policy saw when it sampled token ``t``.
    """
    backbone, head = backbone_and_score(model)
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state
    select = completion_mask[:, 1:].bool()  # (B, T-1)
    v = head(hidden[:, :-1][select]).float().squeeze(-1)  # (N,)
    out = v.new_zeros(select.shape).masked_scatter(select, v)
    return torch.cat([v.new_zeros(select.shape[0], 1), out], dim=1)


def pools_last_token(model) -> bool:
    """True for a decoder with a linear ``score`` head on ``model.base_model`` (Llama, Mistral, Qwen, GPT-2,
    GPT-NeoX, ...): the models :func:`last_token_rewards` scores."""
    head = getattr(model, "score", None)
    return isinstance(head, torch.nn.Linear) and model.base_model is not model


def last_token_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` rewards of right-padded rows: the ``score`` head at each row's last real token.

    ``input_ids`` and ``attention_mask`` are ``(B, T)``. The position comes from the mask, never from token
    ids, so a row ending with EOS is scored at that EOS even when pad == EOS. A peft wrapper is seen
    through: its LoRA layers sit inside the backbone and its ``score`` is the trainable copy. Naive
    equivalent, one unpadded row at a time::

        model.score(model.base_model(ids[None]).last_hidden_state)[0, -1, 0]
    """
    model = base_model(model)
    lengths = attention_mask.sum(-1)  # (B,)
    if (lengths == 0).any():
        raise ValueError(f"row {int((lengths == 0).nonzero()[0])} has no real tokens")
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]  # (B, H)
    return model.score(last)[:, 0]
