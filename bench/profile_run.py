"""Where a runner's time goes: sample one run with py-spy and print inclusive time per Python function.

    python -m bench.profile_run --workload dpo --side prefalign --precision fp32 --steps 3
    python -m bench.profile_run --workload ppo --side trl --precision bf16 --steps 2 --native

py-spy (installed into ``.bench/tools``) samples the runner process at ``--rate`` Hz without touching its
code and writes raw collapsed stacks (``.bench/profiles/<name>.txt``, loadable in speedscope). The summary
counts, for every function, the share of samples whose stack contains it (inclusive time), so phases
(``forward``, ``backward``, ``step``, ``generate``, ``_compute_loss`` ...) can be read off directly. Model
loading and imports are in the profile too: compare phases, not totals. ``--native`` adds C/C++ frames
(the aten kernels under each phase) at a higher sampling cost.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from bench import envs
from bench.__main__ import DATA_DIR, child_env, ensure_data, runner
from bench.common import PRECISIONS, WORKLOADS

TOOLS = envs.BENCH_DIR / "tools"
PY_SPY = TOOLS / "bin" / "py-spy"


def ensure_py_spy() -> Path:
    if not PY_SPY.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TOOLS)], check=True)
        subprocess.run([str(TOOLS / "bin" / "python"), "-m", "pip", "install", "--quiet", "py-spy"], check=True)
    return PY_SPY


FRAME = re.compile(r"^(?P<func>[^ ]+) \((?P<file>[^:)]+)(?::\d+)?\)$")


def short(frame: str) -> str:
    """``func (path/to/pkg/mod.py:12)`` -> ``func (pkg/mod.py)``."""
    m = FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    parts = Path(m["file"]).parts
    for anchor in ("site-packages", "work", "main"):
        if anchor in parts:
            parts = parts[len(parts) - parts[::-1].index(anchor) :]
    return f"{m['func']} ({'/'.join(parts[-2:])})"


def inclusive(collapsed: str) -> tuple[Counter, int]:
    """``(samples per function present in the stack, total samples)`` from py-spy raw output."""
    counts, total = Counter(), 0
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        total += int(n)
        for f in {short(fr) for fr in stack.split(";")}:
            counts[f] += int(n)
    return counts, total


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.profile_run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", required=True, choices=WORKLOADS)
    ap.add_argument("--side", required=True, choices=("prefalign", "trl", "hf-generate"))
    ap.add_argument("--precision", default="fp32", choices=PRECISIONS)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rate", type=int, default=25)
    ap.add_argument("--native", action="store_true")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--grep", default=None, help="only functions matching this regex")
    args = ap.parse_args(argv)
    py_spy = ensure_py_spy()
    ensure_data(print)
    venv, script = runner(args.workload, args.side)
    name = f"{args.workload}-{args.precision}-{args.side}"
    out_dir = envs.BENCH_DIR / "profiles"
    work = out_dir / f"work-{name}"
    work.mkdir(parents=True, exist_ok=True)
    raw = out_dir / f"{name}.txt"
    cmd = [
        str(py_spy),
        "record",
        "--format",
        "raw",
        "--rate",
        str(args.rate),
        "-o",
        str(raw),
        *(["--native"] if args.native else []),
        "--",
        str(envs.venv_python(venv)),
        str(script),
        "--workload",
        args.workload,
        "--precision",
        args.precision,
        "--steps",
        str(args.steps),
        "--data",
        str(DATA_DIR),
        "--work",
        str(work),
        "--threads",
        str(args.threads),
    ]
    proc = subprocess.run(
        cmd,
        cwd=envs.ROOT,
        env=child_env(args.threads, args.workload, args.side, args.precision),
        capture_output=True,
        text=True,
    )
    result = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT")]
    print(result[-1] if result else proc.stdout[-2000:] + proc.stderr[-2000:])
    counts, total = inclusive(raw.read_text())
    pattern = re.compile(args.grep) if args.grep else None
    print(f"{total} samples at {args.rate} Hz ({raw}); inclusive share of samples:")
    shown = 0
    for func, n in counts.most_common():
        if pattern and not pattern.search(func):
            continue
        print(f"{100 * n / total:6.1f}%  {func}")
        shown += 1
        if shown == args.top:
            break


if __name__ == "__main__":
    main()
