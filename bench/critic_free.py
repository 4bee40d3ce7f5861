"""PPO-RLHF against the critic-free arms (GRPO, RLOO) at a race's own settings: peak memory and wall time per
episode, measured side by side.

    python -m bench.critic_free --race runs/compare --arms ppo grpo rloo --steps 8 --repeats 2

``--race`` is a finished ``prefalign compare --arms ppo grpo ...`` output: each arm's exact command line is read
from the first line of its stage log (``logs/seed-0_<arm>.log``), so the runs here use the race's model, prompts,
reward model, K, lengths, epochs and precision; only ``--max-steps`` (and the output directory) change. Each run
is a fresh process (its peak RSS is its own ``wait4`` rusage); the repeats alternate the order of the arms
(A B C, C B A, ...) so drift of this shared machine lands on every arm, and a run starts only once other work on
the machine has stopped (``bench.__main__.wait_for_quiet``). Time per episode: the median of the iterations'
wall times (``wall_seconds`` differences in ``metrics.jsonl``, the first iteration dropped: it pays for warm-up)
divided by the episodes (completions) of one iteration. Results: ``--out`` (``raw.jsonl``, ``results.md``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.__main__ import wait_for_quiet

GIB_KIB = 1024 * 1024


def stage_command(race: Path, arm: str, seed: int = 0) -> list[str]:
    """The race's command line of ``arm`` (without ``--output``/``--overwrite``), from its stage log."""
    log = race / "logs" / f"seed-{seed}_{arm}.log"
    if not log.exists():
        raise SystemExit(f"{log}: no such stage log; run `prefalign compare --arms ... {arm} ...` into {race} first")
    first = log.read_text(errors="replace").splitlines()[0]
    if not first.startswith("$ "):
        raise SystemExit(f"{log}: the first line is not the stage's command ('$ python -m prefalign ...')")
    argv = first[2:].split()
    # the held-out evaluation is the race's measurement, not training: the arms are timed and weighed without it
    heldout = {"--heldout-prompts": 1, "--heldout-judge": 1, "--heldout-every": 1, "--heldout-limit": 1}
    drop = {"--output": 1, "--overwrite": 0, "--max-steps": 1, **heldout}
    return without_flags(argv[argv.index("prefalign") + 1 :], drop)


def without_flags(argv: list[str], flags: dict[str, int]) -> list[str]:
    """``argv`` without each flag of ``flags`` and the number of values it takes."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in flags:
            i += 1 + flags[argv[i]]
            continue
        out.append(argv[i])
        i += 1
    return out


def iteration_figures(metrics: list[dict]) -> dict:
    """Median seconds per iteration (first dropped), episodes per iteration and the median phase split (of the
    training rows: a row without ``episodes``, an evaluation's, is not an iteration)."""
    metrics = [m for m in metrics if "episodes" in m]
    walls = [b["wall_seconds"] - a["wall_seconds"] for a, b in itertools.pairwise(metrics)]
    if not walls:
        raise ValueError("need at least 2 iterations to time one after the warm-up")
    episodes = metrics[1]["episodes"] - metrics[0]["episodes"]
    phases = {k: statistics.median(m[k] for m in metrics[1:]) for k in metrics[0] if k.startswith("time/")}
    return {
        "s_per_iteration": statistics.median(walls),
        "episodes_per_iteration": episodes,
        "s_per_episode": statistics.median(walls) / episodes,
        **phases,
    }


def run_one(cmd: list[str], work: Path, threads: int) -> dict:
    """One fresh ``prefalign`` process; its figures and peak RSS."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    full = [sys.executable, "-m", "prefalign", *cmd, "--output", str(work), "--overwrite"]
    with (work.parent / f"{work.name}.log").open("w") as log:
        proc = subprocess.Popen(full, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(full)} failed; log {work.parent / f'{work.name}.log'}")
    metrics = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    return {**iteration_figures(metrics), "peak_rss_gib": usage.ru_maxrss / GIB_KIB}


def table(runs: list[dict], arms: list[str]) -> str:
    """Per arm: median over repeats of peak RSS and seconds per episode, each also as a ratio to the first arm."""
    keys = [k for k in runs[0] if k.startswith(("s_", "peak", "time/"))]
    med = {a: {k: statistics.median(r[k] for r in runs if r["arm"] == a) for k in keys} for a in arms}
    base = med[arms[0]]
    phases = sorted(k for k in base if k.startswith("time/"))
    head = [
        "arm",
        "peak RSS GiB",
        f"x {arms[0]}",
        "s / iteration",
        "episodes / iteration",
        "s / episode",
        f"x {arms[0]}",
        *[p.split("/")[1] + " s" for p in phases],
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in arms:
        m = med[a]
        eps = next(r["episodes_per_iteration"] for r in runs if r["arm"] == a)
        cells = [
            a,
            f"{m['peak_rss_gib']:.2f}",
            f"{m['peak_rss_gib'] / base['peak_rss_gib']:.2f}",
            f"{m['s_per_iteration']:.2f}",
            str(eps),
            f"{m['s_per_episode']:.3f}",
            f"{m['s_per_episode'] / base['s_per_episode']:.2f}",
            *[f"{m.get(p, 0.0):.2f}" for p in phases],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.critic_free", description=__doc__.split("\n\n")[0])
    ap.add_argument("--race", required=True, type=Path, help="a finished compare output with these arms")
    ap.add_argument("--arms", nargs="+", default=["ppo", "grpo", "rloo"], help="the first is the reference")
    ap.add_argument("--steps", type=int, default=8, help="iterations per run (the first is not timed)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--max-wait", type=float, default=60.0, help="seconds to wait for a quiet machine per run")
    ap.add_argument("--out", type=Path, default=Path(".bench") / "critic-free" / time.strftime("%Y%m%d-%H%M%S"))
    args = ap.parse_args(argv)
    if args.steps < 3:
        ap.error("--steps must be >= 3: one warm-up iteration and at least two timed ones")
    commands = {a: stage_command(args.race, a) + ["--max-steps", str(args.steps)] for a in args.arms}
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    with (args.out / "raw.jsonl").open("w") as raw:
        for rep in range(args.repeats):
            for arm in args.arms if rep % 2 == 0 else args.arms[::-1]:
                busy = wait_for_quiet(args.max_wait, lambda m: print(m, file=sys.stderr)) if args.max_wait else None
                res = {
                    "arm": arm,
                    "repeat": rep,
                    "busy_before": busy,
                    **run_one(commands[arm], args.out / f"{rep}-{arm}", args.threads),
                }
                print(
                    f"[critic-free] {arm} repeat {rep + 1}: {res['s_per_episode']:.3f} s/episode, "
                    f"peak RSS {res['peak_rss_gib']:.2f} GiB",
                    file=sys.stderr,
                    flush=True,
                )
                raw.write(json.dumps(res) + "\n")
                runs.append(res)
    md = (
        f"`python -m bench.critic_free {' '.join(argv if argv is not None else sys.argv[1:])}`: "
        f"{args.repeats} repeat(s) alternating, {args.steps} iterations per run\n\n"
        + "\n".join(f"- {a}: `prefalign {' '.join(c)}`" for a, c in commands.items())
        + "\n\n"
        + table(runs, args.arms)
    )
    (args.out / "results.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
