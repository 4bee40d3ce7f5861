"""`prefalign compare`: PPO-RLHF vs DPO on the same pairs, measured."""

from prefalign.compare.config import ARMS, PRESETS, CompareConfig
from prefalign.compare.runner import Comparison

__all__ = ["ARMS", "PRESETS", "CompareConfig", "Comparison"]
