"""Race prefalign against Hugging Face TRL on speed and memory: same model, data, config, machine, one run.

    python -m bench                 # the full race (make bench): every workload, fp32 and bf16, 3 repeats
    python -m bench --quick         # a few-minute smoke: fp32, 1 repeat, 2 steps per run
    python -m bench --workloads dpo,reward --precisions fp32 --repeats 5
    python -m bench --device cuda --python-from-env --quick      # on a GPU machine (bench/gpu.sh: the GPU table)

Each timed run is a fresh subprocess (its peak RSS is the ``wait4`` rusage of that child alone). For every
(workload, precision) the repeats alternate sides, A B, B A, A B, ..., so drift of this shared machine
lands on both. Results: ``.bench/results/<stamp>/`` (``raw.jsonl`` one line per run, ``results.md``,
``results.json``) and the tables on stdout. See BENCHMARKS.md for what the figures mean. ``--device``,
``--model`` and ``--python-from-env`` choose the device, the model and the interpreters (`bench.device`,
`bench.models`); their defaults are the CPU race as it always ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench import device, envs, report
from bench.common import PRECISIONS, RESULT_PREFIX, WORKLOADS
from bench.device import CPU, Where
from bench.models import MODELS

ROOT = envs.ROOT
DATA_DIR = CPU.data_dir
N_PAIRS = 64  # enough pairs for 8 steps of 8; each run reads the first steps x 8 in file order
MAX_LENGTH = 256

# steps per run (the first `warmup` are not timed): full run / --quick
STEPS = {"dpo": 2, "dpo_lora": 2, "reward": 3, "ppo": 4, "grpo": 3, "rollout8": 3, "rollout16": 3}
QUICK_STEPS = {**{w: 2 for w in WORKLOADS}, "ppo": 3}  # one timed step past the warm-up
# PPO's first two iterations are not its steady state on either side: the optimiser state of two models is
# created in the first update and the heap grows to the update's working set over the first two (BENCHMARKS.md,
# "Page faults"); a long run lives at the speed of the later iterations
WARMUP = {**{w: 1 for w in WORKLOADS}, "ppo": 2}


def runner(workload: str, side: str) -> tuple[str, Path]:
    """``(venv name, script)`` that runs ``side`` of ``workload``."""
    if side == "prefalign":
        return "prefalign", ROOT / "bench" / "run_prefalign.py"
    if side == "hf-generate":
        return "prefalign", ROOT / "bench" / "run_generate.py"
    if workload == "ppo":
        return "trl-1.12", ROOT / "bench" / "run_trl_ppo.py"
    if workload == "grpo":
        return "trl-1.16", ROOT / "bench" / "run_trl_grpo.py"
    return "trl-1.16", ROOT / "bench" / "run_trl.py"


def child_env(threads: int, workload: str, side: str, precision: str, device: str = "cpu") -> dict[str, str]:
    """A runner's environment: this one's, less accelerate's settings, with the race's threads, offline and quiet.
    On the CPU the GPU is hidden (a GPU machine's CPU race stays a CPU race); on cuda the children see what this
    process sees (``CUDA_VISIBLE_DEVICES`` as the user set it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if workload == "ppo" and side == "trl" and precision == "bf16":
        # TRL 1.12's PPOTrainer builds Accelerator() without the config's precision; this is how it gets bf16
        env["ACCELERATE_MIXED_PRECISION"] = "bf16"
    return env


def busy_cores(interval: float = 2.0) -> float:
    """Cores' worth of CPU time the whole machine used over ``interval`` seconds (from /proc/stat)."""

    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    (t0, i0), _ = sample(), time.sleep(interval)
    t1, i1 = sample()
    cores = os.cpu_count() or 1
    return cores * (1 - (i1 - i0) / max(t1 - t0, 1))


def wait_for_quiet(max_wait: float, log, threshold: float = 0.3) -> float:
    """Wait (up to ``max_wait`` s) until other work uses less than ``threshold`` cores; return the last reading.

    This machine is shared: a run that starts while another job holds a core measures that job as much
    as ours (with 2 threads on 2 cores, every parallel region then waits on a descheduled thread).
    """
    deadline = time.monotonic() + max_wait
    busy = busy_cores()
    while busy >= threshold and time.monotonic() < deadline:
        log(f"          machine busy ({busy:.2f} cores in use by other work); waiting ...")
        time.sleep(10)
        busy = busy_cores()
    return busy


def launch(cmd: list[str], log_path: Path, env: dict[str, str]):
    """Run ``cmd`` as a fresh process, its output to ``log_path``: ``(its last BENCH_RESULT dict or None, wall
    seconds, its own rusage)`` (``wait4``: the peak RSS and CPU time of that child alone). Raises with the log's
    tail when it exits non-zero."""
    t = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    text = log_path.read_text(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = "\n".join(text.splitlines()[-25:])
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {code}); log {log_path}:\n{tail}")
    lines = [ln for ln in text.splitlines() if ln.startswith(RESULT_PREFIX)]
    return (json.loads(lines[-1][len(RESULT_PREFIX) :]) if lines else None), wall, usage


def run_one(
    workload: str,
    side: str,
    precision: str,
    steps: int,
    threads: int,
    out: Path,
    index: int,
    busy_before: float | None = None,
    extra: list[str] = (),
    where: Where = CPU,
) -> dict:
    """One fresh process; returns its result line plus wait4 figures. Raises on a failed run."""
    venv, script = runner(workload, side)
    work = out / "work" / f"{index:03d}-{workload}-{precision}-{side}"
    work.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(where.python(venv)),
        str(script),
        "--workload",
        workload,
        "--precision",
        precision,
        "--steps",
        str(steps),
        "--data",
        str(where.data_dir),
        "--work",
        str(work),
        "--threads",
        str(threads),
        *where.runner_args,
        *extra,
    ]
    load = os.getloadavg()[0]
    res, wall, usage = launch(cmd, work / "log.txt", child_env(threads, workload, side, precision, where.device))
    if res is None:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit 0, no {RESULT_PREFIX.strip()} line); log {work / 'log.txt'}")
    res.update(
        peak_rss_kib=usage.ru_maxrss,
        wall=wall,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        loadavg=load,
        busy_before=busy_before,
        repeat_index=index,
        work=str(work),
    )
    return res


def replay_check(
    workload: str, precision: str, runs: list[dict], threads: int, out: Path, index: int, log, where: Where = CPU
):
    """The same-math run of a sampling workload (grpo, fp32): the baseline trains on the completions that the
    first prefalign run of ``(workload, precision)`` sampled, recorded in its ``rollouts.json``. None when
    there is nothing to replay (no prefalign run, or the workload is not checked that way)."""
    if workload not in report.REPLAYED or precision != "fp32":
        return None
    ours, base = report.sides(workload)
    recorded = [r for r in runs if (r["workload"], r["precision"], r["side"]) == (workload, precision, ours)]
    if not recorded:
        return None
    path = Path(recorded[0]["work"]) / "rollouts.json"
    steps = len(json.loads(path.read_text()))
    log(f"[bench] {workload:9s} {precision} {base:11s} same-math replay of {path} ({steps} steps) ...")
    res = run_one(workload, base, precision, steps, threads, out, index, extra=["--replay", str(path)], where=where)
    x, ref = res["extra"], recorded[0]
    # the later steps' gradient norms check the update too (same completions, after the same AdamW steps)
    log(
        f"          {base} on prefalign's completions: loss {res['losses'][0]:.3e} (prefalign "
        f"{ref['losses'][0]:.3e}), mean log-prob {x['first_logps'][0]:.6f} ({ref['extra']['first_logps'][0]:.6f}), "
        f"grad norms {', '.join(f'{g:.6f}' for g in x['grad_norms'])} "
        f"({', '.join(f'{g:.6f}' for g in ref['extra']['grad_norms'])}), |Δ advantage| "
        f"{x['advantage_max_diff']:.1e}, |Δ reward| {x['reward_max_diff']:.1e}, prompt-id mismatches "
        f"{x['token_mismatches']}"
    )
    return res


def ensure_data(log, where: Where = CPU) -> None:
    """Prepare ``where``'s inputs (bench.prepare) unless its stamp says they were made by this prepare.py for this
    model (a random model also by this bench/models.py): switching the model re-prepares."""
    data = where.data_dir
    stamp = data / "stamp.json"
    want = {
        "pairs": N_PAIRS,
        "max_length": MAX_LENGTH,
        "prepare": (ROOT / "bench" / "prepare.py").stat().st_mtime,
        "model": where.model,
    }
    # the default's own prepare command, unchanged; a random model is named, and its builder's version kept
    model_arg = [] if where.model == "default" else [where.model]
    if model_arg:
        want["builder"] = (ROOT / "bench" / "models.py").stat().st_mtime
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return
    log(f"[bench] preparing inputs in {data} ...")
    subprocess.run(
        [str(where.python("prefalign")), "-m", "bench.prepare", str(data), str(N_PAIRS), str(MAX_LENGTH), *model_arg],
        cwd=ROOT,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
    )
    stamp.write_text(json.dumps(want))


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke: fp32 only, 1 repeat, 2 steps per run")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    ap.add_argument("--precisions", default=None, help="comma list of fp32, bf16 (default both; --quick: fp32)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per side (default 3; --quick: 1)")
    ap.add_argument("--steps", type=int, default=None, help="steps per run for every workload (default: per workload)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch threads on both sides")
    ap.add_argument(
        "--max-wait",
        type=float,
        default=30.0,
        help="seconds to wait before each run for other work on the machine to stop (0: never wait)",
    )
    ap.add_argument("--out", default=None, help="results directory (default .bench/results/<stamp>)")
    ap.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="cpu: every run on the CPU with the GPU hidden (the race as it always ran); cuda: the models on the "
        "first visible GPU, peak GPU memory in the table",
    )
    ap.add_argument(
        "--model",
        default=None,
        choices=MODELS,
        help="default: the embedded SmolLM2-135M weights; random-135m / random-1b: a seeded random Llama of the "
        "default's shape / of a 1.07e9-parameter shape (bench/models.py). Unset: default, or random-135m under "
        "--device cuda where the default's weights are not here",
    )
    ap.add_argument(
        "--python-from-env",
        action="store_true",
        help="run every side with this interpreter instead of the project and TRL venvs (nothing is built); a "
        "baseline whose TRL version is not installed here is skipped, its reason in the table",
    )
    ap.add_argument(
        "--data",
        default=None,
        help="prepared inputs directory (default .bench/data; a random model: .bench/data-MODEL)",
    )
    args = ap.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.precisions = args.precisions.split(",") if args.precisions else (["fp32"] if args.quick else list(PRECISIONS))
    args.repeats = args.repeats or (1 if args.quick else 3)
    for w in args.workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    for p in args.precisions:
        if p not in PRECISIONS:
            ap.error(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
    if args.steps is not None:
        least = max(WARMUP[w] for w in args.workloads) + 1  # PPO's two warm-up iterations: 3
        if not least <= args.steps <= N_PAIRS // 8:
            ap.error(f"--steps must be in [{least}, {N_PAIRS // 8}] here: the warm-up steps and a timed one at least")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    # refused (one line) before anything is written: a GPU race where no GPU is seen, an interpreter without prefalign
    where = Where(args.device, from_env=args.python_from_env, data=Path(args.data) if args.data else None)
    gpu = device.check(where)
    model, note = device.pick_model(args.model, args.device)
    where = dataclasses.replace(where, model=model)
    if note:
        log(f"[bench] {note}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else envs.BENCH_DIR / "results" / stamp
    out.mkdir(parents=True, exist_ok=True)

    venvs, skipped = prepare_sides(args.workloads, where, log)
    ensure_data(log, where)
    if where.from_env:
        versions = {sys.executable: envs.installed_versions("prefalign", where.python("prefalign"))}
    else:
        versions = {name: envs.installed_versions(name) for name in ["prefalign", *venvs]}
    log("[bench] measuring the matmul peak ...")
    peaks = json.loads(
        subprocess.run(
            [str(where.python("prefalign")), "-m", "bench.flops", "--threads", str(args.threads), *where.runner_args],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    steps = {w: args.steps or (QUICK_STEPS if args.quick else STEPS)[w] for w in args.workloads}

    runs, failures = race(args, steps, out, log, where, skipped)

    comps, solos = report.comparisons(runs, WARMUP), report.solos(runs, WARMUP, skipped)
    meta = {
        "stamp": stamp,
        "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "threads": args.threads,
        "repeats": args.repeats,
        "steps": steps,
        "warmup": WARMUP,
        "peak_gflops": peaks,
        "params": model_params(runs, where.data_dir),
        "cpu": cpu_name(),
        "python": platform.python_version(),
        "versions": versions,
    }
    # only what differs from the CPU race as it always ran, so that race's results.json keeps its fields
    if gpu:
        meta["gpu"] = gpu
    if where.model != "default":
        meta["model"] = where.model
    if where.from_env:
        meta["python_from_env"] = sys.executable
    md = report.render(meta, comps, runs, solos) + "".join(f"\nFAILED RUN: {f}\n" for f in failures)
    (out / "results.md").write_text(md)
    results = {"meta": meta, "comparisons": [report.comparison_json(c) for c in comps]}
    if solos:
        results["skipped"] = [report.solo_json(s) for s in solos]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(md)
    log(f"[bench] done in {meta['wall_seconds'] / 60:.1f} min; results in {out}")
    failed = [c for c in comps if c.same_math is False]
    for c in failed:
        log(
            f"[bench] SAME-MATH FAILURE: {c.workload} {c.precision}: Δloss {c.loss_diff}, Δlogp {c.logps_diff}, "
            f"Δ grad norm (relative) {c.grad_norm_diff}"
        )
    return 1 if failed or failures else 0


def prepare_sides(workloads: list[str], where: Where, log) -> tuple[list[str], dict[str, str]]:
    """``(TRL venvs built, {workload: why its baseline is skipped})``: the venvs the baselines need are built
    (`bench.envs`); with ``--python-from-env`` nothing is built and a baseline whose TRL is missing is skipped."""
    if not where.from_env:
        envs.ensure_project_venv()
    needed = sorted({runner(w, s)[0] for w in workloads for s in report.sides(w)} - {"prefalign"})
    skipped = {}
    for w in workloads:
        reason = device.skip_reason(runner(w, report.sides(w)[1])[0], where)
        if reason:
            skipped[w] = reason
            log(f"[bench] {w}: baseline skipped: {reason}")
    if where.from_env:
        return [], skipped
    for name in needed:
        envs.ensure_trl_venv(name, log)
    return needed, skipped


def race(
    args, steps: dict[str, int], out: Path, log, where: Where = CPU, skipped: dict[str, str] | None = None
) -> tuple[list[dict], list[str]]:
    """Every run of the race, alternating sides per repeat, then each workload's same-math replay (if it has
    one); ``(runs, failures)``. A workload in ``skipped`` runs our side alone. Each run's line goes to
    ``raw.jsonl`` as soon as it ends."""
    skipped = skipped or {}
    runs: list[dict] = []
    failures: list[str] = []
    index = 0
    with (out / "raw.jsonl").open("w") as raw:

        def keep(res: dict) -> None:
            runs.append(res)
            raw.write(json.dumps(res) + "\n")
            raw.flush()

        for workload in args.workloads:
            both = report.sides(workload)
            sides = both[:1] if workload in skipped else both
            for precision in args.precisions:
                for rep in range(args.repeats):
                    for side in sides if rep % 2 == 0 else sides[::-1]:
                        log(f"[bench] {workload:9s} {precision} {side:11s} repeat {rep + 1}/{args.repeats} ...")
                        busy = wait_for_quiet(args.max_wait, log) if args.max_wait > 0 else None
                        index += 1
                        try:
                            res = run_one(
                                workload,
                                side,
                                precision,
                                steps[workload],
                                args.threads,
                                out,
                                index - 1,
                                busy,
                                where=where,
                            )
                        except RuntimeError as e:  # keep racing the rest; listed, and it fails the exit code
                            log(f"[bench] RUN FAILED: {e}")
                            failures.append(f"{workload} {precision} {side} repeat {rep + 1}: {str(e).splitlines()[0]}")
                            continue
                        keep(res)
                        gpu = res.get("peak_gpu_bytes")
                        log(
                            f"          steps {', '.join(f'{s:.1f}' for s in res['step_seconds'])} s, "
                            + ("" if gpu is None else f"peak GPU {gpu / report.GIB_BYTES:.2f} GiB, ")
                            + f"peak RSS {res['peak_rss_kib'] / report.GIB:.2f} GiB, CPU share "
                            f"{res['cpu_seconds'] / res['wall']:.2f}, other work at start "
                            f"{'-' if busy is None else f'{busy:.2f}'} cores"
                        )
                if workload in skipped:  # the replay is the baseline's run
                    continue
                try:
                    res = replay_check(workload, precision, runs, args.threads, out, index, log, where)
                except RuntimeError as e:
                    log(f"[bench] REPLAY FAILED: {e}")
                    failures.append(f"{workload} {precision} same-math replay: {str(e).splitlines()[0]}")
                    res = None
                if res is not None:
                    index += 1
                    keep(res)
    return runs, failures


def model_params(runs: list[dict], data: Path = DATA_DIR) -> int:
    """Total parameters of the raced model (a full fine-tuning run trains all of them): a full-DPO run's count,
    else bench.prepare's."""
    for r in runs:
        if r["workload"] == "dpo" and r.get("trainable_params"):
            return int(r["trainable_params"])
    info = data / "model.json"
    if info.exists():
        return int(json.loads(info.read_text())["params"])
    return 134_515_008  # SmolLM2-135M (tied embeddings), as reported by a full-DPO run


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
