"""Inputs both sides of the race read, built once per machine with prefalign's venv (deterministic).

Run as ``python -m bench.prepare OUT_DIR N_PAIRS MAX_LENGTH [MODEL]`` from the project venv. Writes:

- ``pairs.jsonl``: explicit ``{"prompt", "chosen", "rejected"}`` rows from the shared HH-RLHF
  harmless-base test file, in file order, keeping only pairs that (a) prefalign keeps *untruncated*
  at ``MAX_LENGTH`` (prompt <= MAX_LENGTH // 2, prompt + longer completion <= MAX_LENGTH) and (b)
  tokenise to the same ids whether the prompt and completion are tokenised apart (prefalign) or
  together (TRL: ``tok(prompt + completion + eos)``, split at the common prefix). So neither side
  truncates and both see identical token ids; each row also stores those ids (``ids``) so the TRL
  runner can assert it.
- ``prefixes.txt``: the packaged movie-review train prefixes (PPO and rollout prompts).
- ``rm-init/``: the raced model as a one-output sequence-classification model whose new score head
  is drawn exactly as ``prefalign reward`` draws it (normal(0, 1/sqrt(H+1)), seed 0). Both reward
  trainers start from it (same initial weights), and PPO on both sides uses it as reward model and
  value-model init.
- ``model_path.txt``: the raced causal LM's directory, which both sides load; ``model.json``: its name (a key of
  `bench.models.MODELS`) and parameter count.

``MODEL`` (an optional fourth argument, default ``default``): a random model of `bench.models` is written to
``model/`` first (seeded), and everything above is built from it; the tokenizer and ids are the default's either way.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.models import hh_rlhf_file, save_random


def joint_ids(tok, prompt: str, completion: str) -> list[int]:
    return tok(prompt + completion + tok.eos_token, add_special_tokens=False)["input_ids"]


def tokenize_by_index(examples, tok) -> list:
    """prefalign's token ids of each example, whole (no ``max_length``), or None where prefalign drops the pair
    at tokenisation (completions that tokenise alike): one entry per example, in its order."""
    from dataclasses import replace

    from prefalign.data.tokens import tokenize_preferences

    named = [replace(e, where=str(i)) for i, e in enumerate(examples)]
    by_index = {int(p.where): p for p in tokenize_preferences(named, tok, None)[0]}
    return [by_index.get(i) for i in range(len(examples))]


def write_rm_init(model: str | None, tok, path: Path):
    """``model`` as a one-output sequence-classification model with prefalign's seeded score-head draw (seed 0),
    saved with ``tok`` to ``path``: the one start of both sides' reward models. Returns the model."""
    from prefalign.trainers.reward import load_reward_backbone

    rm, _ = load_reward_backbone(model, tok.pad_token_id, seed=0)
    rm.save_pretrained(path)
    tok.save_pretrained(path)
    return rm


def main(out: Path, n_pairs: int, max_length: int, model: str = "default") -> None:
    from prefalign.data import load_preferences
    from prefalign.models import load_tokenizer
    from prefalign.models.loading import resolve_model
    from prefalign.resources import movie_prefixes

    out.mkdir(parents=True, exist_ok=True)
    # None: the embedded default, as prefalign's own None resolves it
    model_dir = None if model == "default" else save_random(model, out / "model")
    tok = load_tokenizer(model_dir)
    examples, _ = load_preferences(str(hh_rlhf_file()), tok)
    # max_length None: every pair tokenised whole; the fit test below is prefalign's "kept untruncated"
    kept = []
    for e, p in zip(examples, tokenize_by_index(examples, tok)):
        if p is None:
            continue
        longest = max(len(p.chosen_ids), len(p.rejected_ids))
        if len(p.prompt_ids) > max_length // 2 or len(p.prompt_ids) + longest > max_length:
            continue
        if (
            joint_ids(tok, e.prompt, e.chosen) != p.prompt_ids + p.chosen_ids
            or joint_ids(tok, e.prompt, e.rejected) != p.prompt_ids + p.rejected_ids
        ):
            continue
        kept.append(
            {
                "prompt": e.prompt,
                "chosen": e.chosen,
                "rejected": e.rejected,
                "ids": [p.prompt_ids, p.chosen_ids, p.rejected_ids],
            }
        )
        if len(kept) == n_pairs:
            break
    if len(kept) < n_pairs:
        raise SystemExit(f"only {len(kept)} of {n_pairs} pairs fit max_length {max_length} untruncated")
    with (out / "pairs.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
    (out / "prefixes.txt").write_text("\n".join(movie_prefixes("train")) + "\n", encoding="utf-8")

    rm = write_rm_init(model_dir, tok, out / "rm-init")
    (out / "model_path.txt").write_text(resolve_model(model_dir))
    # the backbone's parameters are the causal LM's (tied embeddings: no separate output layer), for the MFU
    params = sum(p.numel() for n, p in rm.named_parameters() if not n.startswith("score."))
    (out / "model.json").write_text(json.dumps({"name": model, "params": params}))
    stats = [len(r["ids"][0]) + max(len(r["ids"][1]), len(r["ids"][2])) for r in kept]
    print(
        json.dumps(
            {
                "pairs": len(kept),
                "examples_scanned": len(examples),
                "max_row_tokens": max(stats),
                "mean_row_tokens": sum(stats) / len(stats),
            }
        )
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:5])
