"""Same quality, not only speed: prefalign and TRL 1.16 train the same models on the same pairs, scored side by side.

    make bench-quality                      # = python -m bench.quality: ~2 h on 2 cores (fp32; reward ~1 h)
    python -m bench.quality --kinds reward --sides prefalign --pairs 64 --heldout 32   # a few-minute smoke

Both sides train, for one epoch, a Bradley-Terry reward model (``reward``, from the same ``rm-init`` as the
speed race: same backbone, same score head draw) and a LoRA DPO policy (``dpo_lora``, r 16, alpha 32,
sigmoid loss, beta 0.1) on the first ``--pairs`` HH-RLHF harmless-base pairs of the shared file (file
order, the explicit prompt / chosen / rejected text that ``prefalign.data.load_preferences`` reads), with
the same model, learning rate (``bench.common.HPARAMS``), batch 8, max length, linear decay without warmup,
gradient clipping at 1.0 and precision. Each library uses its own data order, truncation and filtering
(what a user of it gets): prefalign cuts the prompt's start (to at most half of ``max_length``, and to what
the longer completion leaves) and drops a pair whose completion does not fit after that; TRL's RewardTrainer
drops pairs longer than ``max_length`` and its DPOTrainer cuts the sequence's end (``keep_start``).

The next ``--heldout`` pairs are scored whole (no truncation, float32) by one scorer here, each model read
the way its own library trains it:

- reward: the pair is right when the chosen completion scores higher, the score head read where both libraries
  train it: the completion's last token before its EOS (prefalign masks the final EOS; TRL's RewardTrainer uses
  Hugging Face's sequence-classification pooling, which skips the trailing EOS because this tokenizer's pad is
  its EOS), i.e. the score of ``prompt + completion`` alone.
- dpo_lora: the pair is right when DPO's implicit reward margin
  ``(logp(y_c) - logp_ref(y_c)) - (logp(y_r) - logp_ref(y_r))`` is positive (sums over completion tokens,
  EOS included; the reference is the base model with the adapter off).

Accuracy is reported on all held-out pairs and on those both libraries keep whole at ``max_length``
(prefalign: prompt <= max_length // 2 and prompt + longer completion <= max_length; TRL: both sequences
<= max_length), each with a 95% percentile-bootstrap interval over pairs and the paired difference
prefalign - TRL (10,000 resamples, scipy). Results: ``.bench/quality/<stamp>/`` (``results.md``,
``results.json``, each run's output directory and log).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import envs
from bench.common import HPARAMS

KINDS = ("reward", "dpo_lora")
SIDES = ("prefalign", "trl")
QUALITY_DIR = envs.BENCH_DIR / "quality"


@dataclass
class Options:
    pairs: int
    heldout: int
    max_length: int
    precision: str
    kinds: list[str]
    sides: list[str]
    threads: int
    out: Path
    model: str | None
    reuse: bool


def parse(argv=None) -> Options:
    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=1000, help="training pairs (the file's first, in order)")
    ap.add_argument("--heldout", type=int, default=300, help="held-out pairs (those after the training pairs)")
    ap.add_argument("--max-length", type=int, default=HPARAMS["max_length"], help="both sides' max_length")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="training precision, both sides")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma list of {', '.join(KINDS)}")
    ap.add_argument("--sides", default=",".join(SIDES), help=f"comma list of {', '.join(SIDES)}")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch threads of each run")
    ap.add_argument("--out", default=None, help="results directory (default .bench/quality/<stamp>)")
    ap.add_argument("--model", default=None, help="base causal LM (default: the embedded default model)")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="score again the models an earlier run left in --out (its results.json), training only what is missing",
    )
    a = ap.parse_args(argv)
    kinds, sides = [k for k in a.kinds.split(",") if k], [s for s in a.sides.split(",") if s]
    for name, got, allowed in (("--kinds", kinds, KINDS), ("--sides", sides, SIDES)):
        bad = [x for x in got if x not in allowed]
        if bad or not got:
            ap.error(f"{name}: {', '.join(bad) or 'empty'} is not one of {', '.join(allowed)}")
    if a.pairs < 8 or a.heldout < 1:
        ap.error(f"--pairs must be >= 8 (one batch) and --heldout >= 1, got {a.pairs} and {a.heldout}")
    out = Path(a.out) if a.out else QUALITY_DIR / time.strftime("%Y%m%d-%H%M%S")
    if a.reuse and not (out / "results.json").is_file():
        ap.error(f"--reuse: {out / 'results.json'} does not exist; give --out the folder of an earlier run")
    return Options(a.pairs, a.heldout, a.max_length, a.precision, kinds, sides, a.threads, out, a.model, a.reuse)


# ------------------------------------------------------------------------------------------- data


def write_splits(opts: Options, tok) -> tuple[list, list]:
    """``train.jsonl`` and ``heldout.jsonl`` under ``opts.out/data``; returns the two lists of examples."""
    from bench.models import hh_rlhf_file
    from prefalign.data import load_preferences

    hh = hh_rlhf_file()
    examples, _ = load_preferences(str(hh), tok)
    need = opts.pairs + opts.heldout
    if len(examples) < need:
        raise SystemExit(f"{hh}: {len(examples)} usable pairs, --pairs + --heldout asks for {need}")
    train, held = examples[: opts.pairs], examples[opts.pairs : need]
    data = opts.out / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("heldout", held)):
        with (data / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(
                json.dumps({"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected}, ensure_ascii=False) + "\n"
                for e in rows
            )
    return train, held


def kept_whole(examples, tok, max_length: int) -> dict[str, list[bool]]:
    """Per pair: whether prefalign, TRL's RewardTrainer and TRL's DPOTrainer see it whole at ``max_length``.

    prefalign: its own truncation leaves the pair's ids unchanged. TRL tokenises ``prompt + completion + EOS``
    as one text (bench.prepare.joint_ids); RewardTrainer keeps a pair when both sequences fit, DPOTrainer
    truncates a sequence that does not fit (and drops a pair whose prompt alone fills max_length)."""
    from bench.prepare import joint_ids, tokenize_by_index
    from prefalign.data.tokens import truncate_pairs

    whole = tokenize_by_index(examples, tok)  # None where prefalign drops the pair before truncation
    cut, _ = truncate_pairs([p for p in whole if p is not None], max_length, None, None)
    unchanged = {id(p) for p in cut}  # truncate_pairs returns the very object when it leaves a pair alone
    ours = [p is not None and id(p) in unchanged for p in whole]
    fits = [
        max(len(joint_ids(tok, e.prompt, e.chosen)), len(joint_ids(tok, e.prompt, e.rejected))) <= max_length
        for e in examples
    ]
    return {"prefalign": ours, "trl": fits, "both": [a and b for a, b in zip(ours, fits)]}


def train_usage(examples, tok, max_length: int) -> dict[str, dict[str, int]]:
    """How each library's length rule treats the training pairs, counted here with its own rule."""
    from prefalign.data.tokens import tokenize_preferences, truncate_pairs

    whole, _ = tokenize_preferences(examples, tok, None)
    cut, report = truncate_pairs(whole, max_length, None, None)
    flags = kept_whole(examples, tok, max_length)
    n, fits = len(examples), sum(flags["trl"])
    # DPOTrainer drops a pair whose prompt alone fills max_length (keep_start would leave no completion)
    full = sum(len(tok(e.prompt, add_special_tokens=False)["input_ids"]) >= max_length for e in examples)
    return {
        "prefalign": {"whole": sum(flags["prefalign"]), "prompt_cut": report.truncated, "dropped": n - len(cut)},
        "trl_reward": {"whole": fits, "dropped": n - fits},
        "trl_dpo": {"whole": fits, "end_cut": n - fits - full, "dropped": full},
    }


# ------------------------------------------------------------------------------------------- training


def train_command(kind: str, side: str, opts: Options, start: str, work: Path) -> list[str]:
    """The command that trains ``kind`` on ``side``: prefalign's own CLI, or TRL's trainer (bench/quality_trl.py)."""
    train = str(opts.out / "data" / "train.jsonl")
    if side == "trl":
        cmd = [str(envs.venv_python("trl-1.16")), str(envs.ROOT / "bench" / "quality_trl.py"), "--kind", kind]
        cmd += ["--train", train, "--model", start, "--out", str(work), "--precision", opts.precision]
        return cmd + ["--max-length", str(opts.max_length), "--threads", str(opts.threads)]
    lr = HPARAMS["lr_reward" if kind == "reward" else "lr_dpo_lora"]
    cmd = [str(envs.PROJECT_PY), "-m", "prefalign", "reward" if kind == "reward" else "dpo", "--model", start]
    cmd += ["--data", train, "--output", str(work), "--max-length", str(opts.max_length), "--epochs", "1"]
    cmd += ["--batch-size", str(HPARAMS["batch_size"]), "--grad-accum", "1", "--learning-rate", str(lr)]
    cmd += ["--lr-scheduler", "linear", "--warmup-steps", "0", "--max-grad-norm", str(HPARAMS["max_grad_norm"])]
    cmd += ["--precision", opts.precision, "--seed", str(HPARAMS["seed"]), "--report-to", "none"]
    if kind == "dpo_lora":
        cmd += ["--loss-type", "sigmoid", "--beta", str(HPARAMS["beta"])]
        cmd += ["--lora-r", str(HPARAMS["lora_r"]), "--lora-alpha", str(HPARAMS["lora_alpha"])]
    return cmd


def train_one(kind: str, side: str, opts: Options, start: str, log) -> dict:
    """Train ``kind`` on ``side``; returns its figures and where its final model is."""
    from bench.__main__ import child_env, launch

    work = opts.out / "runs" / f"{kind}-{side}"
    work.parent.mkdir(parents=True, exist_ok=True)
    cmd = train_command(kind, side, opts, start, work)
    if side == "trl":  # prefalign creates its own --output (and refuses one that is not empty)
        work.mkdir(parents=True, exist_ok=True)
    log(f"[quality] training {kind} with {side} ...")
    env = child_env(opts.threads, kind, side, opts.precision)
    res, wall, usage = launch(cmd, opts.out / "runs" / f"{kind}-{side}.log", env)
    rss = usage.ru_maxrss
    if side == "prefalign":
        rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines() if x.strip()]
        res = {"losses": [r["loss"] for r in rows if "loss" in r]}
    out = {"kind": kind, "side": side, "wall": wall, "peak_rss_kib": rss, "final": str(work / "final"), **res}
    log(f"          {wall / 60:.1f} min, peak RSS {rss / 2**20:.2f} GiB, {len(out['losses'])} steps")
    return out


# ------------------------------------------------------------------------------------------- scoring


def reward_margins(final: str, held):
    """``score(chosen) - score(rejected)`` per held-out pair, ``(n,)`` numpy, read at the completion's last token
    (where both libraries train the head: before the EOS). Whole sequences, float32."""
    import torch
    from tqdm import tqdm

    from prefalign.rewards import RewardModel

    rm = RewardModel(final, batch_size=8, max_length=1_000_000)
    # every completion as one row, longest first: a batch's rows have similar lengths, so little padding
    rows = [(e.prompt, c) for e in held for c in (e.chosen, e.rejected)]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]) - len(rows[i][1]))
    scores = torch.zeros(len(rows), dtype=torch.float64)
    for i in tqdm(range(0, len(order), rm.batch_size), desc=f"scoring {Path(final).parent.name}", unit="batch"):
        idx = order[i : i + rm.batch_size]
        scores[idx] = rm.score([rows[j][0] for j in idx], [rows[j][1] for j in idx]).double()
    return (scores[0::2] - scores[1::2]).numpy()


def policy_logps(model, pairs, tok, batch: int = 4):
    """Summed completion log-probs (EOS included) of every pair, ``(n, 2)`` [chosen, rejected], whole sequences."""
    import torch
    from tqdm import tqdm

    from prefalign.data.collate import PreferenceCollator
    from prefalign.models.logprobs import completion_logprobs, sequence_logprobs

    collate = PreferenceCollator(tok.pad_token_id)
    out = []
    with torch.inference_mode():
        for i in tqdm(range(0, len(pairs), batch), desc="log-probs", unit="batch"):
            b = collate(pairs[i : i + batch])
            lp = completion_logprobs(model, b["input_ids"], b["attention_mask"], b["completion_mask"])
            seq = sequence_logprobs(lp, b["completion_mask"]).double()  # (2n,): chosen rows, then rejected rows
            out.append(seq.view(2, -1).T)
    return torch.cat(out).numpy()


def dpo_margins(base: str, finals: dict[str, str], held, tok) -> dict[str, object]:
    """DPO's implicit reward margin per held-out pair for each side's adapter (the reference, the base model with
    the adapter off, is the same for every side: scored once)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from prefalign.data.tokens import tokenize_preferences

    # longest first: the batches' padding stays small and a memory problem shows at once
    pairs, _ = tokenize_preferences(held, tok, None)
    if len(pairs) != len(held):  # bench.prepare keeps only pairs prefalign tokenises: a margin per held pair
        raise ValueError(f"{len(held) - len(pairs)} held-out pairs drop at tokenisation; re-run bench.prepare")
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i].prompt_ids) - len(pairs[i].chosen_ids))
    ordered = [pairs[i] for i in order]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ref = policy_logps(model, ordered, tok)
    out = {}
    for side, final in finals.items():
        policy = PeftModel.from_pretrained(model, final).eval()
        lp = policy_logps(policy, ordered, tok)
        model = policy.unload()  # the base model back, without this side's LoRA layers
        margin = (lp[:, 0] - ref[:, 0]) - (lp[:, 1] - ref[:, 1])
        out[side] = margin[sorted(range(len(order)), key=order.__getitem__)]  # back to file order
    return out


# ------------------------------------------------------------------------------------------- statistics


def correct(margins):
    """1 where the chosen completion wins, 0 where it loses, 1/2 on a tie."""
    import numpy as np

    m = np.asarray(margins, dtype=float)
    return (m > 0) + 0.5 * (m == 0)


def interval(*samples, n_resamples: int = 10_000) -> tuple[float, float, float]:
    """``(value, low, high)``: the mean of one sample, or the paired difference of two means, with its 95%
    percentile-bootstrap interval over pairs (scipy, seeded)."""
    import numpy as np
    from scipy.stats import bootstrap

    def stat(*xs, axis=-1):
        return xs[0].mean(axis) if len(xs) == 1 else xs[0].mean(axis) - xs[1].mean(axis)

    xs = [np.asarray(s, dtype=float) for s in samples]
    if len(xs[0]) < 2:
        v = float(stat(*xs))
        return v, v, v
    res = bootstrap(
        xs, stat, paired=len(xs) > 1, vectorized=True, n_resamples=n_resamples, method="percentile", random_state=0
    )
    return float(stat(*xs)), float(res.confidence_interval.low), float(res.confidence_interval.high)


# ------------------------------------------------------------------------------------------- report

NAMES = {"prefalign": "prefalign", "trl": "TRL 1.16"}


def accuracy_rows(kind: str, margins: dict[str, object], subsets: dict[str, list[bool]]) -> list[dict]:
    """One row per subset of held-out pairs: each side's accuracy and, with both sides, their paired difference."""
    import numpy as np

    rows = []
    for name, mask in subsets.items():
        keep = np.asarray(mask, dtype=bool)
        row = {"kind": kind, "subset": name, "n": int(keep.sum())}
        hits = {side: correct(m)[keep] for side, m in margins.items()}
        for side, h in hits.items():
            row[side] = interval(h) if row["n"] else None  # no pair in the subset: nothing to report
        if len(hits) == 2 and row["n"]:
            row["diff"] = interval(hits["prefalign"], hits["trl"])
        rows.append(row)
    return rows


def fmt(v: tuple[float, float, float] | None, signed: bool = False) -> str:
    if v is None:
        return "–"
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(v[0])} [{f.format(v[1])}, {f.format(v[2])}]"


def render(meta: dict, usage: dict, runs: list[dict], acc: list[dict]) -> str:
    sides = [s for s in SIDES if any(r["side"] == s for r in runs)]
    lines = [
        f"## bench-quality {meta['stamp']}",
        "",
        f"`{meta['command']}` — {meta['wall_seconds'] / 60:.1f} min; {meta['pairs']} training pairs (HH-RLHF "
        f"harmless-base, file order), {meta['heldout']} held-out pairs after them, max_length {meta['max_length']}, "
        f"{meta['precision']}, batch {HPARAMS['batch_size']}, one epoch; reward lr {HPARAMS['lr_reward']}, LoRA DPO "
        f"lr {HPARAMS['lr_dpo_lora']} (r {HPARAMS['lora_r']}, alpha {HPARAMS['lora_alpha']}, beta {HPARAMS['beta']}).",
        "",
        "Training pairs under each library's length rule: prefalign "
        f"{usage['prefalign']['whole']} whole, {usage['prefalign']['prompt_cut']} with the prompt's start cut, "
        f"{usage['prefalign']['dropped']} dropped; TRL RewardTrainer {usage['trl_reward']['whole']} kept, "
        f"{usage['trl_reward']['dropped']} dropped; TRL DPOTrainer {usage['trl_dpo']['whole']} whole, "
        f"{usage['trl_dpo']['end_cut']} with the sequence's end cut, {usage['trl_dpo']['dropped']} dropped (the "
        "prompt alone fills max_length).",
        "",
        "Held-out pair accuracy (scored whole, float32; 95% bootstrap intervals over pairs; the difference is paired):",
        "",
        "| model | held-out pairs | n | "
        + " | ".join(NAMES[s] for s in sides)
        + (" | prefalign − TRL |" if len(sides) == 2 else " |"),
        "|---|---|---|" + "---|" * len(sides) + ("---|" if len(sides) == 2 else ""),
    ]
    for r in acc:
        cells = [fmt(r[s]) for s in sides] + ([fmt(r["diff"], True)] if "diff" in r else [])
        lines.append(f"| {r['kind']} | {r['subset']} | {r['n']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| model | side | pairs kept | optimizer steps | mean loss, last 10 steps | process wall | peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        tail = r["losses"][-10:]
        lines.append(
            f"| {r['kind']} | {NAMES[r['side']]} | {r['train_rows']} | {len(r['losses'])} | "
            f"{sum(tail) / max(len(tail), 1):.4f} | {r['wall'] / 60:.1f} min | {r['peak_rss_kib'] / 2**20:.2f} GiB |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    opts = parse(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bench.prepare import write_rm_init
    from prefalign.models import load_tokenizer
    from prefalign.models.loading import resolve_model

    envs.ensure_project_venv()
    if "trl" in opts.sides:
        envs.ensure_trl_venv("trl-1.16", log)
    opts.out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(opts.model)
    base = resolve_model(opts.model)
    train, held = write_splits(opts, tok)
    usage = train_usage(train, tok, opts.max_length)
    starts = {"dpo_lora": base}
    if "reward" in opts.kinds:
        # both reward trainers start from the same weights: the backbone and prefalign's seeded score-head draw
        rm_init = opts.out / "data" / "rm-init"
        write_rm_init(opts.model, tok, rm_init)
        starts["reward"] = str(rm_init)
    earlier = json.loads((opts.out / "results.json").read_text())["runs"] if opts.reuse else []
    done = {(r["kind"], r["side"]): r for r in earlier if Path(r["final"]).is_dir()}
    runs = []
    for i, kind in enumerate(opts.kinds):
        # alternate which side goes first, so the machine's drift lands on both
        for side in opts.sides if i % 2 == 0 else opts.sides[::-1]:
            if (kind, side) in done:
                log(f"[quality] {kind} with {side}: reusing {done[kind, side]['final']}")
                runs.append(done[kind, side])
                continue
            run = train_one(kind, side, opts, starts[kind], log)
            if side == "prefalign":
                run["train_rows"] = opts.pairs - usage["prefalign"]["dropped"]
            runs.append(run)
    log(f"[quality] scoring {len(held)} held-out pairs ...")
    finals = {kind: {r["side"]: r["final"] for r in runs if r["kind"] == kind} for kind in opts.kinds}
    flags = kept_whole(held, tok, opts.max_length)
    subsets = {"all": [True] * len(held), "both keep whole": flags["both"]}
    acc = []
    if "reward" in finals:
        margins = {side: reward_margins(f, held) for side, f in finals["reward"].items()}
        acc += accuracy_rows("reward", margins, subsets)
    if "dpo_lora" in finals:
        acc += accuracy_rows("dpo_lora", dpo_margins(base, finals["dpo_lora"], held, tok), subsets)
    meta = {
        "stamp": opts.out.name,
        "command": " ".join(["python -m bench.quality", *(argv if argv is not None else sys.argv[1:])]),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "pairs": opts.pairs,
        "heldout": opts.heldout,
        "max_length": opts.max_length,
        "precision": opts.precision,
        "hparams": HPARAMS,
    }
    md = render(meta, usage, runs, acc)
    (opts.out / "results.md").write_text(md)
    (opts.out / "results.json").write_text(json.dumps({"meta": meta, "usage": usage, "runs": runs, "accuracy": acc}))
    print(md)
    log(f"[quality] done in {meta['wall_seconds'] / 60:.1f} min; results in {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
