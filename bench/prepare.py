"""Inputs both sides of the race read, built once per machine with prefalign's venv (deterministic).

Run as ``python -m bench.prepare OUT_DIR N_PAIRS MAX_LENGTH`` from the project venv. Writes:

- ``pairs.jsonl``: explicit ``{"prompt", "chosen", "rejected"}`` rows from the shared HH-RLHF
  harmless-base test file, in file order, keeping only pairs that (a) prefalign keeps *untruncated*
  at ``MAX_LENGTH`` (prompt <= MAX_LENGTH // 2, prompt + longer completion <= MAX_LENGTH) and (b)
  tokenise to the same ids whether the prompt and completion are tokenised apart (prefalign) or
  together (TRL: ``tok(prompt + completion + eos)``, split at the common prefix). So neither side
  truncates and both see identical token ids; each row also stores those ids (``ids``) so the TRL
  runner can assert it.
- ``prefixes.txt``: the packaged movie-review train prefixes (PPO and rollout prompts).
- ``rm-init/``: the default model as a one-output sequence-classification model whose new score head
  is drawn exactly as ``prefalign reward`` draws it (normal(0, 1/sqrt(H+1)), seed 0). Both reward
  trainers start from it (same initial weights), and PPO on both sides uses it as reward model and
  value-model init.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HH_RLHF = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def joint_ids(tok, prompt: str, completion: str) -> list[int]:
    return tok(prompt + completion + tok.eos_token, add_special_tokens=False)["input_ids"]


def main(out: Path, n_pairs: int, max_length: int) -> None:
    from prefalign.data import load_preferences, tokenize_preferences
    from prefalign.models import load_tokenizer
    from prefalign.models.loading import resolve_model
    from prefalign.resources import movie_prefixes
    from prefalign.trainers.reward import load_reward_backbone

    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(None)
    examples, _ = load_preferences(str(HH_RLHF), tok)
    # max_length None: every pair tokenised whole; the fit test below is prefalign's "kept untruncated"
    pairs, _ = tokenize_preferences(examples, tok, None)
    kept = []
    for e, p in zip(examples, pairs):
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

    model, _ = load_reward_backbone(None, tok.pad_token_id, seed=0)
    model.save_pretrained(out / "rm-init")
    tok.save_pretrained(out / "rm-init")
    (out / "model_path.txt").write_text(resolve_model(None))
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
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
