"""prefalign: align causal language models with human preferences (PPO-RLHF and DPO)."""

__version__ = "0.1.0"
