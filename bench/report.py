"""Pure helpers: from raw runs to figures, ratios, target verdicts and markdown tables (no torch, no I/O).

A *run* is one runner process's result (`bench.common`) plus what the orchestrator measured around it:
``peak_rss_kib`` (``wait4`` rusage of that child), ``wall``, ``cpu_seconds`` and ``loadavg``. A GPU run
(``--device cuda``) also carries the runner's ``peak_gpu_bytes`` (``torch.cuda.max_memory_allocated``).

Per (workload, precision, side), over all repeats:
    step seconds    median / min / max of every timed step pooled (the first ``warmup`` steps of each run dropped)
    items/s         items per step / median step seconds (pairs, episodes)
    tokens/s        rollout: tokens of the timed steps / their seconds, per run, median over runs
    peak RSS        median over runs (and the max)
    peak GPU        GPU runs: median over runs of the peak GPU memory; the memory target applies to it there
    MFU             model FLOPs per second / the measured matmul peak of that precision, where model FLOPs
                    = 6 x params x tokens for a training step (forward + backward of the trained model;
                    reference / value / reward forwards are not counted) and 2 x params x tokens for
                    generation; tokens = real (unpadded) tokens. The same formula on both sides, so the
                    MFU ratio equals the speed ratio; it says how far from the hardware both are.

Same math (fp32 only): the first step's loss and log-probs (DPO: mean summed log-probs of chosen and rejected;
grpo: mean per-token log-prob of the completions) and, where both report it, the first step's pre-clip gradient
norm (relative difference). Workloads that sample (`SAMPLED`) train on different completions on each side, so
their timed runs are never compared: grpo (`REPLAYED`) is checked on a *replay* run, the baseline trained on the
completions that prefalign's first run sampled; ppo is not checked.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

SIDES = {"rollout8": ("prefalign", "hf-generate"), "rollout16": ("prefalign", "hf-generate")}
DEFAULT_SIDES = ("prefalign", "trl")
GENERATION = ("rollout8", "rollout16")
ITEM_NAME = {
    "dpo": "pairs",
    "dpo_lora": "pairs",
    "reward": "pairs",
    "ppo": "episodes",
    "grpo": "episodes",
    "rollout8": "tokens",
    "rollout16": "tokens",
}
# (speed ratio prefalign / baseline at least, peak RSS ratio at most): the targets
TARGETS = {
    "dpo": (1.6, 0.5),
    "dpo_lora": (1.6, 0.5),
    "reward": (1.0, 0.5),
    "ppo": (2.0, 0.8),  # issue 13: <= 0.8x TRL's peak (the floor of weights + gradients + AdamW is ~0.7x)
    "grpo": (2.0, 0.5),
    "rollout8": (3.0, None),
    "rollout16": (3.0, None),
}
# where a target depends on the precision (issue 13: PPO >= 2x TRL in bf16, >= 1.5x in fp32)
SPEED_TARGETS_BY_PRECISION = {("ppo", "fp32"): 1.5}
SAMPLED = ("ppo", "grpo")  # each side samples its own completions: timed runs' losses are not comparable
REPLAYED = ("grpo",)  # checked on a replay run of prefalign's completions (see the module docstring)
SAME_MATH_TOL = 1e-4
GIB = 1024 * 1024  # KiB per GiB
GIB_BYTES = 1024**3


def sides(workload: str) -> tuple[str, str]:
    """``(ours, baseline)`` side names of a workload."""
    return SIDES.get(workload, DEFAULT_SIDES)


def timed(values: list[float], warmup: int) -> list[float]:
    """The values after the first ``warmup`` (all of them if a run is too short to drop any)."""
    return values[warmup:] if len(values) > warmup else list(values)


@dataclass
class Figures:
    runs: int
    step_median: float
    step_min: float
    step_max: float
    items_per_s: float
    tokens_per_s: float
    rss_gib: float
    rss_max_gib: float
    cpu_share: float  # CPU seconds / wall seconds of the runs (2.0 = both cores all the time)
    first_loss: float | None
    first_logps: tuple[float, ...] | None
    second_loss: float | None = None  # after one optimizer step on each side: the update's check
    first_grad_norm: float | None = None
    gpu_gib: float | None = None  # GPU runs: median peak GPU memory (GiB)


def figures(runs: list[dict], warmup: int) -> Figures:
    """Aggregate the repeats of one (workload, precision, side)."""
    if not runs:
        raise ValueError("no runs to aggregate")
    steps = [s for r in runs for s in timed(r["step_seconds"], warmup)]
    med = statistics.median(steps)
    rates = []
    for r in runs:
        secs, toks = timed(r["step_seconds"], warmup), timed(r["tokens"], warmup)
        rates.append(sum(toks) / sum(secs))
    rss = [r["peak_rss_kib"] / GIB for r in runs]
    gpu = [r["peak_gpu_bytes"] / GIB_BYTES for r in runs if "peak_gpu_bytes" in r]
    first = runs[0]
    x = first.get("extra", {})
    logps = tuple(x["first_logps"]) if "first_logps" in x else None
    if "first_logps_chosen" in x:
        logps = (x["first_logps_chosen"], x["first_logps_rejected"])
    return Figures(
        runs=len(runs),
        step_median=med,
        step_min=min(steps),
        step_max=max(steps),
        items_per_s=first["items_per_step"] / med,
        tokens_per_s=statistics.median(rates),
        rss_gib=statistics.median(rss),
        rss_max_gib=max(rss),
        cpu_share=sum(r["cpu_seconds"] for r in runs) / sum(r["wall"] for r in runs),
        first_loss=first["losses"][0] if first.get("losses") else None,
        second_loss=first["losses"][1] if len(first.get("losses") or ()) > 1 else None,
        first_logps=logps,
        first_grad_norm=x.get("first_grad_norm"),
        gpu_gib=statistics.median(gpu) if gpu else None,
    )


def mfu(workload: str, fig: Figures, params: int, peak_gflops: float) -> float:
    """Model FLOPs utilisation in [0, 1] (module docstring)."""
    per_token = 2 if workload in GENERATION else 6
    return per_token * params * fig.tokens_per_s / (peak_gflops * 1e9)


@dataclass
class Comparison:
    workload: str
    precision: str
    ours: Figures
    base: Figures
    speed_ratio: float  # ours / baseline throughput (> 1: we are faster)
    rss_ratio: float  # ours / baseline peak RSS (< 1: we are leaner)
    loss_diff: float | None  # |first-step loss ours - baseline|
    logps_diff: float | None  # max |first-step mean log-prob ours - baseline| (chosen, rejected; grpo: one)
    grad_norm_diff: float | None = None  # |first-step grad norm ours - baseline| / baseline's
    second_loss_diff: float | None = None  # |second-step loss ours - baseline| (the same batches: dpo, reward)
    gpu_ratio: float | None = None  # GPU runs: ours / baseline peak GPU memory (< 1: we are leaner)

    @property
    def speed_target(self) -> float:
        return SPEED_TARGETS_BY_PRECISION.get((self.workload, self.precision), TARGETS[self.workload][0])

    @property
    def rss_target(self) -> float | None:
        return TARGETS[self.workload][1]

    @property
    def speed_met(self) -> bool:
        return self.speed_ratio >= self.speed_target

    @property
    def rss_met(self) -> bool | None:
        return None if self.rss_target is None else self.rss_ratio <= self.rss_target

    @property
    def gpu_met(self) -> bool | None:
        """The memory target on the GPU's memory (None off a GPU or without a target)."""
        if self.gpu_ratio is None or self.rss_target is None:
            return None
        return self.gpu_ratio <= self.rss_target

    @property
    def same_math(self) -> bool | None:
        """Checked in fp32 only (bf16 autocast rounds differently on each side by design)."""
        if self.precision != "fp32" or self.loss_diff is None:
            return None
        worst = max(self.loss_diff, self.logps_diff or 0.0, self.grad_norm_diff or 0.0, self.second_loss_diff or 0.0)
        return worst <= SAME_MATH_TOL


def compare(workload: str, precision: str, ours: Figures, base: Figures, check: Figures | None = None) -> Comparison:
    """``check``: the baseline's replay run (`REPLAYED` workloads), whose first-step figures replace the timed
    runs' in the same-math check; a `SAMPLED` workload without one is not checked."""
    speed = ours.tokens_per_s / base.tokens_per_s if workload in GENERATION else base.step_median / ours.step_median
    math_base = check if check is not None else (None if workload in SAMPLED else base)
    loss_diff = logps_diff = grad_diff = None
    if math_base is not None and ours.first_loss is not None and math_base.first_loss is not None:
        loss_diff = abs(ours.first_loss - math_base.first_loss)
    if math_base is not None and ours.first_logps and math_base.first_logps:
        logps_diff = max(abs(a - b) for a, b in zip(ours.first_logps, math_base.first_logps))
    if math_base is not None and ours.first_grad_norm is not None and math_base.first_grad_norm:
        grad_diff = abs(ours.first_grad_norm - math_base.first_grad_norm) / abs(math_base.first_grad_norm)
    gpu = ours.gpu_gib / base.gpu_gib if ours.gpu_gib and base.gpu_gib else None
    # the first DPO loss is ln 2 whatever the weights, and a LoRA adapter starts at zero: the second step's loss,
    # on the same batch order, is what checks the update itself (sampled workloads draw other rows at step 2)
    second = None
    if workload not in SAMPLED and math_base is not None and None not in (ours.second_loss, math_base.second_loss):
        second = abs(ours.second_loss - math_base.second_loss)  # type: ignore[operator]
    return Comparison(
        workload,
        precision,
        ours,
        base,
        speed,
        ours.rss_gib / base.rss_gib,
        loss_diff,
        logps_diff,
        grad_diff,
        second_loss_diff=second,
        gpu_ratio=gpu,
    )


def group(runs: list[dict], replays: bool = False) -> dict[tuple[str, str, str], list[dict]]:
    """Timed runs (``replays``: the replay runs instead) keyed by (workload, precision, side), in the order first
    seen."""
    out: dict[tuple[str, str, str], list[dict]] = {}
    for r in runs:
        if bool(r.get("replay")) == replays:
            out.setdefault((r["workload"], r["precision"], r["side"]), []).append(r)
    return out


def comparisons(runs: list[dict], warmup: dict[str, int]) -> list[Comparison]:
    """Every (workload, precision) that has runs on both sides; ``warmup`` steps per workload."""
    grouped, replayed = group(runs), group(runs, replays=True)
    out = []
    seen = []
    for workload, precision, _ in grouped:
        if (workload, precision) in seen:
            continue
        seen.append((workload, precision))
        a, b = sides(workload)
        if (workload, precision, a) in grouped and (workload, precision, b) in grouped:
            w = warmup.get(workload, 1)
            check = replayed.get((workload, precision, b))
            out.append(
                compare(
                    workload,
                    precision,
                    figures(grouped[workload, precision, a], w),
                    figures(grouped[workload, precision, b], w),
                    figures(check, w) if check else None,
                )
            )
    return out


@dataclass
class Solo:
    """A (workload, precision) whose baseline was skipped (`bench.device.skip_reason`): our figures alone."""

    workload: str
    precision: str
    ours: Figures
    reason: str


def solos(runs: list[dict], warmup: dict[str, int], skipped: dict[str, str]) -> list[Solo]:
    """Our side of every (workload, precision) whose baseline ``skipped`` names (workload -> reason)."""
    out = []
    for (workload, precision, side), rs in group(runs).items():
        if workload in skipped and side == sides(workload)[0]:
            out.append(Solo(workload, precision, figures(rs, warmup.get(workload, 1)), skipped[workload]))
    return out


def figures_json(f: Figures) -> dict:
    """``f`` for results.json; ``gpu_gib`` only where there is one (a CPU race's file keeps its fields)."""
    return {k: v for k, v in vars(f).items() if k != "gpu_gib" or v is not None}


def comparison_json(c: Comparison) -> dict:
    """One results.json comparison; the GPU memory ratio and verdict only on a GPU."""
    out = {
        "workload": c.workload,
        "precision": c.precision,
        "speed_ratio": c.speed_ratio,
        "rss_ratio": c.rss_ratio,
        "speed_met": c.speed_met,
        "rss_met": c.rss_met,
        "same_math": c.same_math,
        "loss_diff": c.loss_diff,
        "logps_diff": c.logps_diff,
        "grad_norm_diff": c.grad_norm_diff,
        "second_loss_diff": c.second_loss_diff,
        "ours": figures_json(c.ours),
        "base": figures_json(c.base),
    }
    if c.gpu_ratio is not None:
        out.update(gpu_ratio=c.gpu_ratio, gpu_met=c.gpu_met)
    return out


def solo_json(s: Solo) -> dict:
    return {"workload": s.workload, "precision": s.precision, "skipped": s.reason, "ours": figures_json(s.ours)}


# ------------------------------------------------------------------------------------------- formatting


def fmt_steps(f: Figures) -> str:
    return f"{f.step_median:.2f} [{f.step_min:.2f}–{f.step_max:.2f}]"


def fmt_rate(workload: str, f: Figures) -> str:
    return f"{f.tokens_per_s:.1f}" if workload in GENERATION else f"{f.items_per_s:.3f}"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def fmt_diff(x: float | None) -> str:
    return "–" if x is None else f"{x:.1e}"


def fmt_math(c: Comparison) -> str:
    grad = "" if c.grad_norm_diff is None else f", ‖g‖ {c.grad_norm_diff:.1e} rel"
    second = "" if c.second_loss_diff is None else f", step 2 {c.second_loss_diff:.1e}"
    return f"{fmt_diff(c.loss_diff)}, {fmt_diff(c.logps_diff)}{grad}{second} ({verdict(c.same_math)})"


def main_table(
    comps: list[Comparison], params: int, peaks: dict[str, float], solos: list[Solo] = (), gpu: bool = False
) -> str:
    """The headline markdown table: one row per (workload, precision), then one per `Solo` (our figures, the
    baseline's cells empty and the reason in its speed cell). ``gpu``: peak GPU memory and its ratio (which the
    memory target then applies to) in place of the RSS ratio; the host's peak RSS stays for information."""
    mem = (
        "peak GPU GiB prefalign / baseline | GPU mem × (target) | peak RSS GiB prefalign / baseline"
        if gpu
        else "peak RSS GiB prefalign / baseline | RSS × (target)"
    )
    head = (
        "| workload | precision | s/step prefalign, median [min–max] | s/step baseline | rate prefalign | "
        f"rate baseline | speed × (target) | {mem} | "
        "MFU prefalign / baseline | same math: Δloss, Δlogp[, Δ‖g‖] (step 1)[, Δloss (step 2)] |"
    )
    rows = [head, "|" + "---|" * (12 if gpu else 11)]
    rows += [_row(c.workload, c.precision, c.ours, c, "", params, peaks, gpu) for c in comps]
    rows += [_row(s.workload, s.precision, s.ours, None, s.reason, params, peaks, gpu) for s in solos]
    return "\n".join(rows)


def _row(workload, precision, ours: Figures, c: Comparison | None, reason, params, peaks, gpu: bool) -> str:
    """One row of `main_table`: a comparison ``c``, or (None) our figures alone with the baseline's ``reason``."""
    base = c.base if c is not None else None
    item = ITEM_NAME[workload]

    def pair(fmt, attr):
        return f"{fmt(getattr(ours, attr))} / " + ("–" if base is None else fmt(getattr(base, attr)))

    def ratio(value, met):
        target = TARGETS[workload][1]
        text = "–" if target is None else f"≤ {target:g}"
        return "–" if value is None else f"**{value:.2f}** ({text}: {verdict(met)})"

    def gib(x):
        return "–" if x is None else f"{x:.2f}"

    mfus = [mfu(workload, f, params, peaks[precision]) for f in (ours, base) if f is not None]
    cells = [
        workload,
        precision,
        fmt_steps(ours),
        "–" if base is None else fmt_steps(base),
        f"{fmt_rate(workload, ours)} {item}/s",
        "–" if base is None else f"{fmt_rate(workload, base)} {item}/s",
        f"baseline skipped: {reason}"
        if c is None
        else f"**{c.speed_ratio:.2f}** (≥ {c.speed_target:g}: {verdict(c.speed_met)})",
    ]
    if gpu:
        cells += [pair(gib, "gpu_gib"), ratio(c and c.gpu_ratio, c and c.gpu_met), pair(gib, "rss_gib")]
    else:
        cells += [pair(gib, "rss_gib"), ratio(c and c.rss_ratio, c and c.rss_met)]
    cells += [" / ".join(f"{100 * m:.1f}%" for m in mfus) + ("" if c else " / –"), "–" if c is None else fmt_math(c)]
    return "| " + " | ".join(cells) + " |"


def ppo_split_table(runs: list[dict], warmup: int, workload: str = "ppo") -> str:
    """Median seconds per iteration phase of ``workload`` (ppo, grpo), per precision and side (timed iterations
    only)."""
    rows = [
        "| precision | side | generation | log-probs / values | scoring | update | total |",
        "|---|---|---|---|---|---|---|",
    ]
    for (w, precision, side), rs in group(runs).items():
        if w != workload:
            continue
        phases = {}
        for key in ("generation", "logprobs", "scoring", "update"):
            vals = [v for r in rs for v in timed(r["extra"]["split"].get(key, []), warmup)]
            phases[key] = statistics.median(vals) if vals else None
        total = statistics.median([s for r in rs for s in timed(r["step_seconds"], warmup)])
        if phases["logprobs"] is None:  # TRL: whatever is left of the iteration after the timed phases
            phases["logprobs"] = total - sum(v for k, v in phases.items() if v is not None and k != "logprobs")
        rows.append(
            f"| {precision} | {side} | "
            + " | ".join(f"{phases[k]:.2f}" for k in ("generation", "logprobs", "scoring", "update"))
            + f" | {total:.2f} |"
        )
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------- the page


def untimed(meta: dict) -> str:
    """``"1; ppo 2"``: the warm-up steps dropped from every run, the common count first."""
    counts = {w: meta["warmup"][w] for w in meta["steps"]}
    common = max(set(counts.values()), key=list(counts.values()).count)
    return "; ".join([str(common), *(f"{w} {n}" for w, n in counts.items() if n != common)])


def machine(meta: dict) -> tuple[str, str]:
    """``(where it ran, the matmul peak's label)`` for the header: the CPU, or on a GPU race the GPU named (and the
    raced model where it is not the default)."""
    model = f", model {meta['model']} ({meta['params'] / 1e9:.2f}B parameters)" if "model" in meta else ""
    if "gpu" not in meta:
        return meta["cpu"] + model, "Matmul peak (best of 7)"
    g = meta["gpu"]
    where = (
        f"GPU **{g['gpu']}** ({g['gpu_memory_gib']} GiB; torch {g['torch']}, CUDA {g['cuda_version']}), "
        f"host {meta['cpu']}{model}"
    )
    return where, "GPU matmul peak (best of 7; fp32 without TF32, as both sides run it)"


def render(meta: dict, comps: list[Comparison], runs: list[dict], solos: list[Solo] = ()) -> str:
    """results.md: the header (command, machine, versions), the main table, the PPO/GRPO splits, the CPU shares."""
    v = meta["versions"]
    where, peak_label = machine(meta)
    peaks = ", ".join(f"{p} {x} GFLOP/s" for p, x in meta["peak_gflops"].items())
    gpu_note = (
        " GPU mem × = prefalign peak GPU memory / baseline's (`torch.cuda.max_memory_allocated` in each run's "
        "process; the memory target applies to it); peak RSS is the host's."
        if "gpu" in meta
        else ""
    )
    lines = [
        f"## Results {meta['stamp']}",
        "",
        f"`{meta['command']}` — {meta['wall_seconds'] / 60:.1f} min, {where}, {meta['threads']} torch threads "
        f"per side, {meta['repeats']} repeat(s) per side alternating A/B, steps per run {meta['steps']} "
        f"(untimed first steps: {untimed(meta)}). {peak_label}: {peaks}.",
        "",
        "Versions: " + "; ".join(f"{k}: " + ", ".join(f"{p} {x}" for p, x in d.items()) for k, d in v.items()),
        "",
        "Speed × = prefalign throughput / baseline throughput (> 1: prefalign faster); RSS × = prefalign peak RSS / "
        "baseline peak RSS (< 1: prefalign leaner)." + gpu_note + " Baseline: TRL 1.16 (dpo, dpo_lora, reward; grpo: "
        "`GRPOTrainer`), TRL 1.12 `trl.experimental.ppo` (ppo), plain `model.generate` (rollout8/16, batch 8/16). "
        "grpo's same math: TRL trained on prefalign's first-step completions (`--replay`).",
        "",
        main_table(comps, meta["params"], meta["peak_gflops"], solos, gpu="gpu" in meta),
    ]
    for workload in ("ppo", "grpo"):
        if any(r["workload"] == workload for r in runs):
            lines += [
                "",
                f"{workload.upper()} time split, median seconds per iteration:",
                "",
                ppo_split_table(runs, meta["warmup"][workload], workload),
            ]
    lines += [
        "",
        "CPU share of the runs (CPU seconds / wall seconds; 2.0 = both cores busy the whole run; well "
        "below that = other work on the machine took the cores):",
        "",
        ", ".join(
            f"{w} {p} {s} {sum(r['cpu_seconds'] for r in rs) / sum(r['wall'] for r in rs):.2f}"
            for (w, p, s), rs in group(runs).items()
        ),
    ]
    return "\n".join(lines) + "\n"
