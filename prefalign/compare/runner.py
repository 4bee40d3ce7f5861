"""The whole experiment: pairs from the starting policy, every arm trained on them, every policy
evaluated on held-out prompts by the gold judge, costs measured, a report written.

Layout of ``--output DIR``::

    prompts/train.jsonl, prompts/heldout.jsonl    the prompts used (written once)
    pairs/                                         `prefalign prefs` run: pairs.jsonl (shared by every arm)
    seed-S/rm, seed-S/ppo, seed-S/dpo, ...         one training run per arm and seed
    seed-S/eval/                                   `prefalign eval` of every arm and the starting policy
    logs/                                          each stage's output
    stages.json                                    wall time and peak memory of finished stages
    report.md, report.html, summary.json, *.png    the report
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

from prefalign.compare.config import CompareConfig
from prefalign.compare.stages import StageResult, StageRunner
from prefalign.errors import UserError
from prefalign.runio import prepare_output_dir, write_config, write_jsonl

log = logging.getLogger(__name__)

LABELS = {"start": "Starting policy", "ppo": "PPO-RLHF", "dpo": "DPO", "dpo_rf": "DPO (reference-free)",
          "ppo_gt": "PPO on the gold judge"}
EVAL_KEYS = ("gold_mean", "gold_std", "proxy_mean", "kl_mean", "kl_std", "win_rate", "length_mean", "eos_rate", "n")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _prompts(source: str | None, split: str, n: int, tokenizer) -> list[str]:
    from prefalign.data import load_prompts
    from prefalign.resources import movie_prefixes

    prompts = movie_prefixes(split) if source is None else load_prompts(source, tokenizer)
    if len(prompts) < n:
        raise UserError(f"{source or f'packaged {split} prefixes'}: {len(prompts)} prompts, fewer than the {n} asked "
                        "for; lower --num-prompts / --eval-prompts or give more prompts")
    return prompts[:n]


class Comparison:
    def __init__(self, cfg: CompareConfig):
        self.user_cfg = cfg
        self.cfg = cfg.resolved()

    # ------------------------------------------------------------------ stages
    def _common(self, seed: int) -> list:
        c = self.cfg
        return ["--model", c.model, "--seed", seed, "--precision", c.precision]

    def _sampling(self) -> list:
        c = self.cfg
        return ["--max-new-tokens", c.max_new_tokens, "--temperature", c.temperature, "--chat" if c.chat else "--no-chat"]

    def _sampler_args(self) -> list:
        """prefs / eval: sampling batch and weights dtype (bf16 copies where the precision is bf16)."""
        from prefalign.trainers.loop import resolve_precision

        c = self.cfg
        dtype = "bfloat16" if resolve_precision(c.precision) == "bf16" else "float32"
        return ["--batch-size", c.sample_batch_size, "--dtype", dtype]

    def _ppo_args(self, seed: int, reward: str, kl_coef: float) -> list:
        c = self.cfg
        return [*self._common(seed), "--prompts", self.train_prompts, "--reward", reward, "--max-steps", c.ppo_steps,
                "--rollout-batch-size", c.ppo_rollout_batch, "--ppo-epochs", c.ppo_epochs, "--learning-rate", c.ppo_lr,
                "--value-learning-rate", c.ppo_value_lr, "--kl-coef", kl_coef, *self._sampling(),
                "--lr-scheduler", "constant", "--sample-every", max(1, c.ppo_steps // 4)]

    def _pair_args(self, seed: int, lr: float, steps: int) -> list:
        c = self.cfg
        return [*self._common(seed), "--data", self.pairs, "--eval-split", c.eval_split, "--max-steps", steps,
                "--learning-rate", lr, "--batch-size", c.batch_size, "--lr-scheduler", "constant",
                "--max-length", 256]

    def run(self) -> dict:
        from tqdm.auto import tqdm

        from prefalign.models import load_tokenizer

        c = self.cfg
        out = prepare_output_dir(c.output, overwrite=c.overwrite, resume=c.resume)
        self.out = out
        write_config(out, self.user_cfg)
        write_config(out / "resolved", c)
        tok = load_tokenizer(c.model)
        (out / "prompts").mkdir(exist_ok=True)
        self.train_prompts = out / "prompts" / "train.jsonl"
        self.heldout_prompts = out / "prompts" / "heldout.jsonl"
        if not (c.resume and self.train_prompts.exists()):
            write_jsonl(self.train_prompts, [{"prompt": p} for p in _prompts(c.train_prompts, "train", c.num_prompts, tok)])
            write_jsonl(self.heldout_prompts,
                        [{"prompt": p} for p in _prompts(c.heldout_prompts, "heldout", c.eval_prompts, tok)])

        plan = self._plan()
        bar = tqdm(total=len(plan), desc="compare", unit="stage")

        def progress(name, skipped):
            bar.set_postfix_str(f"{name}{' (done before)' if skipped else ''}")

        runner = StageRunner(out, resume=c.resume, progress=progress)
        self.results: dict[str, StageResult] = {}
        for name, command, args in plan:
            self.results[name] = runner.run(name, command, args())
            bar.update(1)
        bar.close()
        summary = self.summarize()
        from prefalign.eval.report import write_report

        write_report(summary, out)
        return summary

    def _plan(self) -> list[tuple[str, str, callable]]:
        """``(stage name, command, args thunk)`` in order; thunks read paths of earlier stages."""
        c = self.cfg
        self.pairs = self.out / "pairs" / "pairs.jsonl"
        plan = [("pairs", "prefs", lambda: [
            "--model", c.model, "--prompts", self.train_prompts, "--judge", c.judge,
            "--num-samples", c.samples_per_prompt, "--pair-rule", c.pair_rule, "--min-gap", c.min_gap,
            *self._sampling(), *self._sampler_args(), "--seed", c.seed])]
        for i in range(c.seeds):
            s = c.seed + i
            d = f"seed-{s}"
            if "ppo" in c.arms:
                plan.append((f"{d}/rm", "reward", lambda s=s: [*self._pair_args(s, c.rm_lr, c.rm_steps)]))
                plan.append((f"{d}/ppo", "ppo", lambda s=s, d=d: self._ppo_args(s, str(self.out / d / "rm" / "final"),
                                                                               c.ppo_kl_coef)))
            if "dpo" in c.arms:
                plan.append((f"{d}/dpo", "dpo", lambda s=s: [*self._pair_args(s, c.dpo_lr, c.dpo_steps),
                                                             "--beta", c.dpo_beta]))
            if "dpo_rf" in c.arms:
                plan.append((f"{d}/dpo_rf", "dpo", lambda s=s: [*self._pair_args(s, c.dpo_lr, c.dpo_steps),
                                                                "--loss-type", "reference_free", "--beta", c.dpo_rf_beta]))
            if "ppo_gt" in c.arms:
                plan.append((f"{d}/ppo_gt", "ppo", lambda s=s: self._ppo_args(s, c.judge, c.ppo_kl_coef)))
            if c.sweep and i == 0:
                if "dpo" in c.arms:
                    for b in c.sweep_betas:
                        plan.append((f"{d}/dpo@beta={b:g}", "dpo", lambda s=s, b=b: [
                            *self._pair_args(s, c.dpo_lr, c.dpo_steps), "--beta", b]))
                if "ppo" in c.arms:
                    for k in c.sweep_kl_coefs:
                        plan.append((f"{d}/ppo@kl={k:g}", "ppo", lambda s=s, d=d, k=k: self._ppo_args(
                            s, str(self.out / d / "rm" / "final"), k)))
            plan.append((f"{d}/eval", "eval", lambda s=s, d=d, i=i: self._eval_args(s, d, i == 0)))
        return plan

    def _policies(self, d: str, with_sweep: bool) -> list[str]:
        names = [a for a in self.cfg.arms]
        if with_sweep and self.cfg.sweep:
            names += [p.name for p in sorted((self.out / d).glob("*@*"))]
        return names

    def _eval_args(self, seed: int, d: str, with_sweep: bool) -> list:
        c = self.cfg
        pol = [f"start={c.model}"] + [f"{a}={self.out / d / a / 'final'}" for a in self._policies(d, with_sweep)]
        args = ["--policies", *pol, "--reference", c.model, "--prompts", self.heldout_prompts, "--judge", c.judge,
                "--num-samples", c.eval_samples, *self._sampling(), *self._sampler_args(), "--seed", seed]
        if "ppo" in c.arms:
            args += ["--proxy", self.out / d / "rm" / "final"]
        return args

    # ------------------------------------------------------------------ summary
    def summarize(self) -> dict:
        import datetime

        c = self.cfg
        seeds = [c.seed + i for i in range(c.seeds)]
        evals = {s: json.loads((self.out / f"seed-{s}" / "eval" / "eval.json").read_text()) for s in seeds}
        pairs_metrics = json.loads((self.out / "pairs" / "metrics.json").read_text())
        pairs_run = self.results["pairs"]
        arms = []
        for name in ["start", *c.arms]:
            per_seed = [self._eval_of(evals[s], name) for s in seeds]
            arm = {"name": name, "label": LABELS[name], "eval": _mean_over_seeds(per_seed),
                   "cost": _mean_over_seeds([self._cost(name, s, pairs_run, pairs_metrics) for s in seeds])}
            if len(seeds) > 1:
                arm["seeds"] = per_seed
            if name != "start":
                arm["curve_metric"], arm["curve"] = self._curve(name, seeds[0])
            arms.append(arm)
        sweep = []
        if c.sweep:
            d = f"seed-{seeds[0]}"
            for name in self._policies(d, True):
                if "@" not in name:
                    continue
                base, setting = name.split("@")
                param, value = setting.split("=")
                e = self._eval_of(evals[seeds[0]], name)
                sweep.append({"arm": base, "param": {"beta": "beta", "kl": "kl_coef"}[param], "value": float(value),
                              "gold_mean": e["gold_mean"], "kl_mean": e["kl_mean"]})
            for base, param, value in (("dpo", "beta", c.dpo_beta), ("ppo", "kl_coef", c.ppo_kl_coef)):
                if base in c.arms:
                    e = self._eval_of(evals[seeds[0]], base)
                    sweep.append({"arm": base, "param": param, "value": value, "gold_mean": e["gold_mean"],
                                  "kl_mean": e["kl_mean"]})
        return {
            "title": "PPO-RLHF vs DPO",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "settings": {k: v for k, v in vars(c).items()},
            "arms": arms,
            "sweep": sweep,
            "samples": self._samples(seeds[0]),
        }

    def _eval_of(self, ev: dict, name: str) -> dict:
        got = ev["policies"][name]
        return {k: got.get(k) for k in EVAL_KEYS}

    def _cost(self, name: str, seed: int, pairs_run: StageResult, pairs_metrics: dict) -> dict:
        c = self.cfg
        d = f"seed-{seed}"
        zero = {"wall_seconds": {"pairs": 0.0, "reward_model": 0.0, "policy": 0.0, "total": 0.0}, "peak_rss_mb": 0.0,
                "tokens_generated": 0, "gradient_steps": 0, "pairs_used": 0, "rm_heldout_accuracy": None}
        if name == "start":
            return zero
        uses_pairs = name != "ppo_gt"
        policy = self.results[f"{d}/{name}"]
        rm = self.results.get(f"{d}/rm") if name == "ppo" else None
        wall = {"pairs": pairs_run.wall_seconds if uses_pairs else 0.0,
                "reward_model": rm.wall_seconds if rm else 0.0, "policy": policy.wall_seconds}
        wall["total"] = round(sum(wall.values()), 3)
        stages = [policy] + ([rm] if rm else []) + ([pairs_run] if uses_pairs else [])
        tokens = pairs_metrics["new_tokens"] if uses_pairs else 0
        steps = 0
        pairs_used = 0
        rm_acc = None
        if name.startswith("ppo"):
            rows = _read_jsonl(Path(policy.out_dir) / "metrics.jsonl")
            tokens += int(sum(r["val/response_length"] * c.ppo_rollout_batch for r in rows))
            steps += c.ppo_steps * c.ppo_epochs
        else:
            steps += c.dpo_steps
            pairs_used = self._pairs_seen(Path(policy.out_dir), c.dpo_steps)
        if rm:
            steps += c.rm_steps
            pairs_used = max(pairs_used, self._pairs_seen(Path(rm.out_dir), c.rm_steps))
            evals = [r for r in _read_jsonl(Path(rm.out_dir) / "metrics.jsonl") if "eval/accuracy" in r]
            rm_acc = evals[-1]["eval/accuracy"] if evals else None
        return {"wall_seconds": wall, "peak_rss_mb": max(s.peak_rss_mb for s in stages), "tokens_generated": tokens,
                "gradient_steps": steps, "pairs_used": pairs_used, "rm_heldout_accuracy": rm_acc}

    @staticmethod
    def _pairs_seen(run_dir: Path, steps: int) -> int:
        info = json.loads((run_dir / "run.json").read_text())
        return min(info["train_examples"], steps * info["global_batch"])

    def _curve(self, name: str, seed: int) -> tuple[str, list[dict]]:
        rows = _read_jsonl(self.out / f"seed-{seed}" / name / "metrics.jsonl")
        key = "objective/scores" if name.startswith("ppo") else "rewards/margins"
        return key, [{"step": r["step"], "wall_seconds": r["wall_seconds"], "metric": r[key]} for r in rows if key in r]

    def _samples(self, seed: int, n: int = 6) -> list[dict]:
        path = self.out / f"seed-{seed}" / "eval" / "completions.jsonl"
        shown = {"start", *self.cfg.arms}
        rows = [r for r in _read_jsonl(path) if r.get("sample", 0) == 0 and r["policy"] in shown]
        by_prompt: dict[str, dict] = {}
        for r in rows:
            entry = by_prompt.setdefault(r["prompt"], {"prompt": r["prompt"], "completions": {}, "gold": {}})
            entry["completions"][r["policy"]] = r["completion"]
            entry["gold"][r["policy"]] = r["gold"]
        return list(by_prompt.values())[:n]


def _mean_over_seeds(items: list[dict]) -> dict:
    """Mean of numeric leaves across seeds (nested dicts kept); one seed: itself."""
    if len(items) == 1:
        return items[0]
    out = {}
    for k, v in items[0].items():
        if isinstance(v, dict):
            out[k] = _mean_over_seeds([it[k] for it in items])
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and all(it[k] is not None for it in items):
            out[k] = statistics.fmean(it[k] for it in items)
        else:
            out[k] = v
    return out
