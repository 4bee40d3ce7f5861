"""Evaluate policies against a reference: gold (and proxy) score, KL to the reference, win rate.

Every policy and the reference sample from the same prompts with the same settings, the RNG reset to
the same seed before each, so a policy identical to the reference draws identical completions. Per
policy, in this order (one model in memory at a time):

1. load the policy; sample ``num_samples`` completions per prompt; sum each response's token log-probs
   under the policy (at the sampling temperature); free it;
2. load the reference; sample its own completions; sum the log-probs of every policy's responses under
   the reference, in the same batches as step 1;
3. score every completion with the gold judge (and the proxy reward model), which also get the prompt rows'
   other columns (e.g. the ``answer`` the ``arithmetic`` judge checks against);
4. per policy: KL to the reference = mean over samples of ``sum_t logp_policy - logp_ref`` (the k1
   estimator of KL(policy || reference) on sequences sampled from the policy); win rate against the
   reference's completion of the same prompt and sample index by the gold judge.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from prefalign.models.loading import DEFAULT_MODEL
from prefalign.rollout.generate import SamplingRunConfig
from prefalign.validation import require_at_least_one

REFERENCE = "reference"
"""The reference's name in the outputs (a policy may not use it)."""


@dataclass
class EvalConfig(SamplingRunConfig):
    """Compare policies with a reference: gold/proxy score, KL to the reference, win rate."""

    policies: list[str] = field(default_factory=list)
    """Policies as NAME=PATH: a model directory, hub id, embedded name or a LoRA run's final/ adapter directory."""
    reference: str = DEFAULT_MODEL
    """Reference policy (what KL and win rate are measured against); any model spec or adapter directory."""
    prompts: list[str] = field(default_factory=list)
    """Prompt files (.txt one per line, .jsonl/.json/.csv/.parquet with a `prompt` column) or literal prompt
    texts; a value that is not an existing path is a prompt, unless it is one word naming a missing file (a data
    suffix, or a path in an existing directory): that is an error."""
    judge: str = ""
    """Gold judge: a built-in judge (vader, arithmetic), module:function / file.py:function, or a reward model; it
    gets the prompt files' other columns (arithmetic: their answer column)."""
    proxy: str | None = None
    """Optional proxy reward (typically the reward model PPO trained against); same kinds as --judge."""
    num_samples: int = 1
    """Completions per prompt and policy."""
    seed: int = 0
    """Random seed, reset before each policy's sampling."""
    output: str = "runs/eval"
    """Output directory: eval.json, eval.md, completions.jsonl, config.yaml."""

    def validate(self):
        super().validate()
        require_at_least_one(self, "num_samples")
        if not self.judge:
            raise ValueError("--judge is required: vader, module:function, file.py:function or a reward model")
        if not self.prompts:
            raise ValueError("--prompts is required: prompt files or literal prompt texts")
        if not self.policies:
            raise ValueError("--policies is required: one or more NAME=PATH")
        self.policy_specs  # noqa: B018  (parses NAME=PATH, raising on a bad value)

    @property
    def policy_specs(self) -> list[tuple[str, str]]:
        """``(name, path)`` per ``--policies`` value, in order."""
        out: list[tuple[str, str]] = []
        for value in self.policies:
            name, eq, path = value.partition("=")
            if not eq or not name.strip() or not path.strip():
                raise ValueError(f"--policies {value!r}: expected NAME=PATH, e.g. dpo=runs/dpo/final")
            name = name.strip()
            if name == REFERENCE:
                raise ValueError(
                    f"--policies {value!r}: the name {REFERENCE!r} is taken by --reference; choose another"
                )
            if name in (n for n, _ in out):
                raise ValueError(f"--policies: the name {name!r} is given twice; names must be unique")
            out.append((name, path.strip()))
        return out

    @property
    def logprob_temperature(self) -> float:
        """The temperature the log-probs are taken at: the sampling one (1 with --greedy)."""
        return 1.0 if self.greedy else self.temperature


def win_rate(scores: torch.Tensor, ref_scores: torch.Tensor) -> tuple[float, dict[str, int]]:
    """Mean of 1 (win) / 0.5 (tie) / 0 (loss) of ``scores (N,)`` against ``ref_scores (N,)``, paired by index.

    Returns ``(rate, {"wins", "ties", "losses"})``. Naive form::

        sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, ref_scores)) / N
    """
    if scores.shape != ref_scores.shape or scores.ndim != 1 or scores.numel() == 0:
        raise ValueError(
            f"need two non-empty (N,) score tensors, got {tuple(scores.shape)} and {tuple(ref_scores.shape)}"
        )
    wins = int((scores > ref_scores).sum())
    ties = int((scores == ref_scores).sum())
    losses = scores.numel() - wins - ties
    return (wins + 0.5 * ties) / scores.numel(), {"wins": wins, "ties": ties, "losses": losses}


def _std(x: torch.Tensor) -> float:
    """Population standard deviation (0 for a single value)."""
    return float(x.double().std(unbiased=False)) if x.numel() else 0.0


@dataclass
class _PolicyRun:
    """What one policy produced: N = prompts x num_samples, in (prompt, sample) order."""

    name: str
    path: str
    samples: list  # list[Sample], N
    logps: torch.Tensor | None = None  # (N,) summed response log-probs under the policy (None: the reference)
    ref_logps: torch.Tensor | None = None  # (N,) the same responses under the reference
    gold: torch.Tensor | None = None  # (N,)
    proxy: torch.Tensor | None = None  # (N,)


def evaluate(cfg: EvalConfig) -> dict:
    """Run the evaluation; write ``eval.json``, ``eval.md``, ``completions.jsonl`` and ``config.yaml``.

    Returns what ``eval.json`` holds: ``{"reference", "policies": {name: metrics}, "settings", "seconds"}``,
    the reference first, then the policies in the order given.
    """
    import time

    from prefalign.data import tokenize_prompts
    from prefalign.data.prompts import read_prompt_rows
    from prefalign.eval.sampling import device, score_samples
    from prefalign.models import load_tokenizer, policy_base
    from prefalign.reward_mix import check_reward_columns
    from prefalign.rewards import load_reward_source
    from prefalign.runio import atomic_write_text, prepare_output_dir, to_plain, write_config, write_json, write_jsonl

    specs = cfg.policy_specs
    dev = device()
    # Everything that can fail on bad input loads before the output directory is made and sampling starts.
    gold = load_reward_source(cfg.judge, batch_size=cfg.batch_size, device=dev)
    proxy = load_reward_source(cfg.proxy, batch_size=cfg.batch_size, device=dev) if cfg.proxy else None
    tokenizer = load_tokenizer(policy_base(cfg.reference)[0])
    for name, path in specs:
        _check_same_tokenizer(tokenizer, path, name)
    prompts, columns = read_prompt_rows(cfg.prompts, tokenizer, cfg.chat)
    check_reward_columns(gold, columns)
    if proxy is not None:
        check_reward_columns(proxy, columns)
    prompt_ids = tokenize_prompts(prompts, tokenizer, cfg.max_prompt_length)
    out_dir = prepare_output_dir(cfg.output, overwrite=cfg.overwrite)

    start = time.perf_counter()
    runs = [_sample_policy(cfg, name, path, tokenizer, prompt_ids, dev) for name, path in specs]  # step 1
    ref = _sample_reference(cfg, tokenizer, prompt_ids, runs, dev)  # step 2
    for run in [ref, *runs]:  # step 3
        run.gold = score_samples(gold, f"--judge {cfg.judge}", prompts, run.samples, columns)
        if proxy is not None:
            run.proxy = score_samples(proxy, f"--proxy {cfg.proxy}", prompts, run.samples, columns)
    seconds = time.perf_counter() - start

    metrics = {run.name: _policy_metrics(run, ref) for run in [ref, *runs]}  # step 4
    _refuse_non_finite(metrics)
    result = {
        "reference": REFERENCE,
        "policies": metrics,
        "settings": {
            **to_plain(cfg),
            "logprob_temperature": cfg.logprob_temperature,
            "prompts_evaluated": len(prompts),
        },
        "seconds": round(seconds, 3),
    }
    # the config with the outputs: a run stopped or refused before them leaves an --overwrite'd directory as it was
    write_config(out_dir, cfg)
    write_json(out_dir / "eval.json", result)
    atomic_write_text(out_dir / "eval.md", markdown_table(metrics))
    write_jsonl(out_dir / "completions.jsonl", _completion_rows(prompts, [ref, *runs]))
    return result


def _check_same_tokenizer(ref_tokenizer, path: str, name: str) -> None:
    """KL compares token log-probs: a policy must read the reference's token ids the same way."""
    from prefalign.errors import UserError
    from prefalign.models import load_tokenizer, policy_base

    try:
        tok = load_tokenizer(policy_base(path)[0])
    except UserError as e:
        raise UserError(f"--policies {name}={path}: {e}") from None
    if tok.get_vocab() != ref_tokenizer.get_vocab():
        raise UserError(
            f"--policies {name}={path}: its tokenizer differs from the reference's; KL to the "
            "reference needs the same vocabulary (give a --reference with the same tokenizer)"
        )


def _load_and_sample(cfg: EvalConfig, path: str, tokenizer, prompt_ids, dev, desc: str):
    """``(model, samples)``: the policy at ``path`` in float32 (for log-probs: KL), and its completions sampled
    from a ``--dtype`` copy (the model itself under float32)."""
    from prefalign.eval.sampling import sample_completions
    from prefalign.models import load_policy
    from prefalign.rollout import sampling_copy

    model = load_policy(path, dtype=torch.float32).to(dev)
    sampler = sampling_copy(model, getattr(torch, cfg.dtype))
    samples = sample_completions(
        sampler, tokenizer, prompt_ids, cfg, cfg.num_samples, cfg.batch_size, cfg.seed, desc=desc
    )
    return model, samples


def _sample_policy(cfg: EvalConfig, name: str, path: str, tokenizer, prompt_ids, dev) -> _PolicyRun:
    from prefalign.eval.sampling import sequence_logps

    model, samples = _load_and_sample(cfg, path, tokenizer, prompt_ids, dev, desc=name)
    logps = sequence_logps(
        model,
        prompt_ids,
        samples,
        cfg.batch_size,
        cfg.logprob_temperature,
        tokenizer.pad_token_id,
        desc=f"{name} log-probs",
    )
    return _PolicyRun(name, path, samples, logps=logps)  # the model is freed on return


def _sample_reference(cfg: EvalConfig, tokenizer, prompt_ids, runs: list[_PolicyRun], dev) -> _PolicyRun:
    from prefalign.eval.sampling import sequence_logps

    model, samples = _load_and_sample(cfg, cfg.reference, tokenizer, prompt_ids, dev, desc=REFERENCE)
    for run in runs:
        run.ref_logps = sequence_logps(
            model,
            prompt_ids,
            run.samples,
            cfg.batch_size,
            cfg.logprob_temperature,
            tokenizer.pad_token_id,
            desc=f"{run.name} reference log-probs",
        )
    return _PolicyRun(REFERENCE, cfg.reference, samples)


def _kl(run: _PolicyRun) -> torch.Tensor:
    """(N,) sequence-level k1 estimate per sample; the reference's is 0 by definition."""
    if run.logps is None:
        return torch.zeros(len(run.samples))
    assert run.ref_logps is not None, "a policy's log-probs come with the reference's"
    return run.logps - run.ref_logps


def _policy_metrics(run: _PolicyRun, ref: _PolicyRun) -> dict:
    """One policy's row of eval.json (the reference's KL is 0 by definition)."""
    assert run.gold is not None and ref.gold is not None, "every policy is scored before its metrics"
    kl = _kl(run)
    rate, counts = win_rate(run.gold, ref.gold)
    lengths = torch.tensor([len(s.response_ids) for s in run.samples], dtype=torch.float64)
    return {
        "model": run.path,
        "n": len(run.samples),
        "gold_mean": float(run.gold.double().mean()),
        "gold_std": _std(run.gold),
        "proxy_mean": float(run.proxy.double().mean()) if run.proxy is not None else None,
        "proxy_std": _std(run.proxy) if run.proxy is not None else None,
        "kl_mean": float(kl.double().mean()),
        "kl_std": _std(kl),
        "win_rate": rate,
        **counts,
        "length_mean": float(lengths.mean()),
        "eos_rate": sum(s.ended for s in run.samples) / len(run.samples),
    }


def _refuse_non_finite(metrics: dict[str, dict]) -> None:
    """A policy whose weights hold NaN or an infinity samples from NaN logits and has NaN log-probs: refused in one
    line (the CLI then removes the output directory it made), not written into eval.json as a bare NaN, which is
    not JSON."""
    import math

    from prefalign.errors import UserError

    for name, row in metrics.items():
        bad = [key for key, value in row.items() if isinstance(value, float) and not math.isfinite(value)]
        if bad:
            what = "--reference" if name == REFERENCE else f"--policies {name}={row['model']}"
            raise UserError(
                f"{what}: {', '.join(bad)} not finite; its weights may hold NaN or inf (see the metrics.jsonl of "
                "the run that wrote them)"
            )


def _completion_rows(prompts: list[str], runs: list[_PolicyRun]) -> list[dict]:
    rows = []
    for run in runs:
        assert run.gold is not None, "every policy is scored before its rows"
        kl = _kl(run).tolist()
        for n, s in enumerate(run.samples):
            rows.append(
                {
                    "policy": run.name,
                    "prompt": prompts[s.prompt],
                    "sample": s.sample,
                    "completion": s.text,
                    "gold": float(run.gold[n]),
                    "proxy": float(run.proxy[n]) if run.proxy is not None else None,
                    "kl": kl[n],
                    "num_tokens": len(s.response_ids),
                    "ended": s.ended,
                }
            )
    return rows


def markdown_table(metrics: dict[str, dict]) -> str:
    """eval.md: one row per policy, the reference first."""
    has_proxy = any(m["proxy_mean"] is not None for m in metrics.values())
    head = (
        ["policy", "gold (mean ± std)"]
        + (["proxy"] if has_proxy else [])
        + ["KL to ref (mean ± std)", "win rate vs ref", "length (tokens)", "EOS rate", "completions"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in metrics.items():
        cells = [name.replace("|", "\\|"), f"{m['gold_mean']:.4f} ± {m['gold_std']:.4f}"]
        if has_proxy:
            cells.append(f"{m['proxy_mean']:.4f}")
        cells += [
            f"{m['kl_mean']:.4f} ± {m['kl_std']:.4f}",
            f"{m['win_rate']:.3f}",
            f"{m['length_mean']:.1f}",
            f"{m['eos_rate']:.2f}",
            str(m["n"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
