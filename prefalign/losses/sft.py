"""Supervised fine-tuning loss on completion tokens."""

from __future__ import annotations

from torch import Tensor

from prefalign.losses.stats import masked_mean


def sft_loss(logps: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean negative log-likelihood of the completion tokens.

    Token-level mean over the whole batch: every completion token weighs the same, so a long
    completion counts more than a short one (the usual causal-LM cross-entropy, restricted to the
    completion so the model is not trained to reproduce prompts).

    Args:
        logps: ``(B, T)`` log-prob of each target token under the model (already shifted so that
            position t scores token t given tokens < t).
        mask: ``(B, T)`` bool or 0/1 completion mask, true on the completion tokens to learn.

    Returns:
        ``(loss, stats)``; loss is 0-dim. stats: ``nll``, the loss detached.

    Raises:
        ValueError: logps and mask differ in shape.
    """
    loss = masked_mean(-logps, mask)
    return loss, {"nll": loss.detach()}
