"""The ``prefalign`` command: ``prefalign <command> [flags]``.

Each command is a module in this package with a ``main(argv) -> int``; heavy imports (torch,
transformers) happen inside those, so ``prefalign --help`` is instant.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from prefalign.allocator import tune_malloc
from prefalign.errors import UserError

# command name -> (module, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("prefalign.cli.generate", "sample completions from a model (batched, JSONL out)"),
    "data": ("prefalign.cli.data", "inspect a dataset: format, rows, drops, token lengths"),
    "sft": ("prefalign.cli.sft", "supervised fine-tuning on completions (the starting policy)"),
    "dpo": ("prefalign.cli.dpo", "DPO and its family on preference pairs, no reward model"),
    "reward": ("prefalign.cli.reward", "train a reward model (scalar head, Bradley-Terry) on preference pairs"),
    "ppo": ("prefalign.cli.ppo", "PPO-RLHF against a reward model, a judge or a Python function"),
    "rl": ("prefalign.cli.rl", "critic-free online RL (GRPO, Dr. GRPO, RLOO, REINFORCE++), K completions per prompt"),
    "prefs": (
        "prefalign.cli.prefs",
        "sample K completions per prompt, score them with a judge, write preference pairs",
    ),
    "eval": ("prefalign.cli.eval", "policies vs a reference: gold/proxy score, KL to the reference, win rate"),
    "compare": ("prefalign.cli.compare", "race PPO-RLHF against DPO on the same pairs, measured, with a report"),
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: prefalign <command> [flags]   (prefalign <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from prefalign import __version__

        print(f"prefalign {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if parent := os.environ.pop("PREFALIGN_STAGE_PARENT", None):  # a compare stage off Linux: end with the race
        from prefalign.compare.stages import exit_with_parent

        exit_with_parent(int(parent))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # ours are the progress bars that matter
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    tune_malloc()  # sampling commands (generate, prefs, eval) churn KV caches and logits like a training step
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(argv[1:]) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
