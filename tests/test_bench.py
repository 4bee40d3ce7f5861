"""The benchmark harness: its pure helpers (bench/report.py, bench/common.py: aggregation, ratios, verdicts,
tables), the GPU path's pieces (bench/device.py, bench/models.py: device, model and interpreter choices) and one
real CPU smoke of `python -m bench`. Nothing here installs or imports TRL."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is a folder of the repo, not installed

from bench import report
from bench.common import StepClock, pair_tokens_per_step, real_response_tokens

ROOT = Path(__file__).resolve().parent.parent
GIB_KIB = 1024 * 1024


def run(
    side="prefalign",
    workload="dpo",
    precision="fp32",
    steps=(9.0, 4.0, 6.0),
    tokens=(100, 100, 100),
    rss_gib=2.0,
    losses=(0.6931,),
    items=8,
    extra=None,
    cpu=10.0,
    wall=20.0,
):
    return {
        "side": side,
        "workload": workload,
        "precision": precision,
        "step_seconds": list(steps),
        "tokens": list(tokens),
        "items_per_step": items,
        "peak_rss_kib": rss_gib * GIB_KIB,
        "losses": list(losses),
        "extra": extra or {},
        "cpu_seconds": cpu,
        "wall": wall,
    }


def test_timed_drops_warmup_but_never_everything():
    assert report.timed([5.0, 1.0, 2.0], 1) == [1.0, 2.0]
    assert report.timed([5.0], 1) == [5.0]  # too short to drop: keep what there is


def test_figures_pool_timed_steps_across_repeats():
    f = report.figures([run(steps=(9.0, 4.0, 6.0), rss_gib=2.0), run(steps=(8.0, 5.0, 7.0), rss_gib=3.0)], warmup=1)
    assert (f.step_median, f.step_min, f.step_max) == (5.5, 4.0, 7.0)
    assert f.items_per_s == pytest.approx(8 / 5.5)
    assert f.rss_gib == pytest.approx(2.5) and f.rss_max_gib == pytest.approx(3.0)
    assert f.tokens_per_s == pytest.approx(statistics_median([200 / 10, 200 / 12]))
    assert f.cpu_share == pytest.approx(0.5)
    assert f.runs == 2


def statistics_median(xs):
    import statistics

    return statistics.median(xs)


def test_figures_refuses_no_runs():
    with pytest.raises(ValueError, match="no runs to aggregate"):
        report.figures([], 1)


def test_compare_ratios_and_verdicts():
    ours = report.figures([run(steps=(1, 2.0, 2.0), rss_gib=1.0)], 1)
    base = report.figures([run(side="trl", steps=(1, 4.0, 4.0), rss_gib=4.0)], 1)
    c = report.compare("dpo", "fp32", ours, base)
    assert c.speed_ratio == pytest.approx(2.0)  # twice the pairs/s
    assert c.rss_ratio == pytest.approx(0.25)
    assert c.speed_met and c.rss_met
    slow = report.compare("dpo", "fp32", base, ours)
    assert not slow.speed_met and not slow.rss_met


def test_ppo_targets_follow_the_precision_and_the_header_names_each_warmup():
    # 1.6x TRL's episodes/s at 0.75x its memory: meets fp32's 1.5x, misses bf16's 2x; <= 0.8 memory in both
    ours = report.figures([run(workload="ppo", steps=(9, 9, 5.0, 5.0), rss_gib=3.0)], 2)
    base = report.figures([run(side="trl", workload="ppo", steps=(9, 9, 8.0, 8.0), rss_gib=4.0)], 2)
    fp32, bf16 = (report.compare("ppo", p, ours, base) for p in ("fp32", "bf16"))
    assert (fp32.speed_target, bf16.speed_target) == (1.5, 2.0)
    assert fp32.speed_met and not bf16.speed_met
    assert fp32.rss_target == 0.8 and fp32.rss_met
    meta = {"steps": {"dpo": 2, "reward": 3, "ppo": 4}, "warmup": {"dpo": 1, "reward": 1, "ppo": 2, "grpo": 1}}
    assert report.untimed(meta) == "1; ppo 2"


def test_generation_speed_is_tokens_per_second_and_has_no_rss_target():
    ours = report.figures([run(workload="rollout8", steps=(1, 1.0), tokens=(0, 300))], 1)
    base = report.figures([run(side="hf-generate", workload="rollout8", steps=(1, 1.0), tokens=(0, 100))], 1)
    c = report.compare("rollout8", "bf16", ours, base)
    assert c.speed_ratio == pytest.approx(3.0) and c.speed_met
    assert c.rss_met is None and c.same_math is None


def test_same_math_checked_in_fp32_only_with_tolerance():
    def pair(precision, loss_b, logp_b):
        ours = report.figures(
            [run(losses=(0.5,), extra={"first_logps_chosen": -10.0, "first_logps_rejected": -9.0})], 1
        )
        base = report.figures(
            [run(side="trl", losses=(loss_b,), extra={"first_logps_chosen": logp_b, "first_logps_rejected": -9.0})], 1
        )
        return report.compare("dpo", precision, ours, base)

    assert pair("fp32", 0.5 + 5e-5, -10.0).same_math is True
    assert pair("fp32", 0.5 + 2e-4, -10.0).same_math is False  # loss off
    assert pair("fp32", 0.5, -10.001).same_math is False  # log-probs off
    assert pair("bf16", 0.7, -12.0).same_math is None  # not judged in bf16
    c = pair("fp32", 0.5, -10.0)
    assert c.loss_diff == 0.0 and c.logps_diff == 0.0


def test_same_math_reads_the_second_step_loss_where_both_sides_train_on_the_same_batches():
    """The first DPO loss is ln 2 whatever the weights (and a LoRA adapter starts at zero): step 2's loss checks
    the update; a sampled workload (grpo, ppo) draws other rows at step 2 and is not read there."""
    logps = {"first_logps_chosen": -10.0, "first_logps_rejected": -9.0}

    def pair(workload, second_b):
        ours = report.figures([run(workload=workload, losses=(0.69, 0.60), extra=logps)], 1)
        base = report.figures([run(workload=workload, side="trl", losses=(0.69, second_b), extra=logps)], 1)
        return report.compare(workload, "fp32", ours, base)

    same, off = pair("dpo_lora", 0.60 + 5e-5), pair("dpo_lora", 0.61)
    assert same.second_loss_diff == pytest.approx(5e-5) and same.same_math is True
    assert off.loss_diff == 0.0 and off.logps_diff == 0.0 and off.same_math is False  # step 1 alone passed
    assert "step 2 1.0e-02 (**missed**)" in report.fmt_math(off)
    assert (
        report.compare(
            "ppo", "fp32", *(report.figures([run(workload="ppo", losses=(0.1, x))], 1) for x in (0.2, 0.9))
        ).second_loss_diff
        is None
    )


def test_comparisons_pair_sides_per_workload_and_skip_one_sided():
    runs = [
        run(),
        run(side="trl"),
        run(workload="reward", precision="bf16"),  # reward has no TRL run
        run(workload="rollout16", side="prefalign"),
        run(workload="rollout16", side="hf-generate"),
    ]
    comps = report.comparisons(runs, {"dpo": 1})
    assert [(c.workload, c.precision) for c in comps] == [("dpo", "fp32"), ("rollout16", "fp32")]


def test_grpo_same_math_is_checked_on_the_replay_run_only():
    math = {"first_logps": [-2.0], "first_grad_norm": 3.0}
    ours = run(workload="grpo", losses=(0.0,), extra=math)
    trl = run(workload="grpo", side="trl", steps=(9.0, 6.0), losses=(0.3,), extra={"first_logps": [-2.5]})

    def replay(grad_norm, logp=-2.0 + 1e-5):
        return {
            **run(
                workload="grpo",
                side="trl",
                steps=(1.0, 1.0),
                losses=(5e-5,),
                extra={"first_logps": [logp], "first_grad_norm": grad_norm},
            ),
            "replay": True,
        }

    [alone] = report.comparisons([ours, trl], {"grpo": 1})
    assert alone.same_math is None and alone.loss_diff is None  # different completions: nothing to compare
    [c] = report.comparisons([ours, trl, replay(3.0003)], {"grpo": 1})
    assert c.base.step_median == 6.0 and c.base.runs == 1  # the replay is not a timed run
    assert c.loss_diff == pytest.approx(5e-5) and c.logps_diff == pytest.approx(1e-5)
    assert c.grad_norm_diff == pytest.approx(0.0003 / 3.0003) and c.same_math is True
    [off] = report.comparisons([ours, trl, replay(3.01)], {"grpo": 1})
    assert off.same_math is False  # the gradient norm is 0.3% off
    table = report.main_table([c], params=100, peaks={"fp32": 1.0, "bf16": 1.0})
    assert "‖g‖ 1.0e-04 rel (met)" in table and "episodes/s" in table


def test_mfu_uses_six_for_training_two_for_generation():
    f = report.figures([run(steps=(1, 1.0), tokens=(0, 1000))], 1)
    assert report.mfu("dpo", f, params=100, peak_gflops=1e-3) == pytest.approx(6 * 100 * 1000 / 1e6)
    assert report.mfu("rollout8", f, params=100, peak_gflops=1e-3) == pytest.approx(2 * 100 * 1000 / 1e6)


def test_main_table_has_a_row_per_comparison_with_verdicts():
    ours = report.figures([run(steps=(1, 2.0), rss_gib=1.0)], 1)
    base = report.figures([run(side="trl", steps=(1, 3.0), rss_gib=4.0)], 1)
    table = report.main_table(
        [report.compare("dpo", "fp32", ours, base)], params=134_515_008, peaks={"fp32": 200.0, "bf16": 800.0}
    )
    lines = table.splitlines()
    assert len(lines) == 3 and lines[0].startswith("| workload")
    row = lines[2]
    assert "| dpo | fp32 |" in row
    assert "**1.50** (≥ 1.6: **missed**)" in row
    assert "**0.25** (≤ 0.5: met)" in row
    assert row.count("|") == lines[0].count("|")


def test_ppo_split_table_fills_trl_logprobs_with_the_rest():
    split = {"generation": [9, 2.0], "scoring": [9, 1.0], "update": [9, 3.0]}
    runs = [
        run(workload="ppo", side="trl", steps=(30, 10.0), extra={"split": split}),
        run(workload="ppo", steps=(30, 8.0), extra={"split": {**split, "logprobs": [9, 1.5]}}),
    ]
    table = report.ppo_split_table(runs, warmup=1)
    assert "| fp32 | trl | 2.00 | 4.00 | 1.00 | 3.00 | 10.00 |" in table
    assert "| fp32 | prefalign | 2.00 | 1.50 | 1.00 | 3.00 | 8.00 |" in table
    grpo = [{**r, "workload": "grpo"} for r in runs]
    assert report.ppo_split_table(runs + grpo, warmup=1, workload="grpo").count("| fp32 |") == 2


def test_pair_tokens_per_step_counts_both_rows_of_each_pair():
    pairs = [{"ids": [[1, 2], [3], [4, 5, 6]]}, {"ids": [[1], [2], [3]]}, {"ids": [[9] * 4, [1], [1]]}]
    # pair 1: (2+1) + (2+3) = 8; pair 2: 2 + 2 = 4; pair 3: 5 + 5 = 10
    assert pair_tokens_per_step(pairs, batch=2, steps=2) == [12, 10]


def test_real_response_tokens_stop_at_first_eos():
    import torch

    ids = torch.tensor([[5, 2, 7, 7], [5, 6, 7, 8], [2, 2, 2, 2]])
    assert real_response_tokens(ids, [2]) == 2 + 4 + 1


def test_step_clock_differences():
    clock = StepClock()
    clock.t0 = 1.0
    clock.marks = [3.0, 4.5, 7.0]
    assert clock.seconds() == [2.0, 1.5, 2.5]


def test_critic_free_reads_the_race_command_and_times_iterations_after_the_first(tmp_path):
    from bench import critic_free

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "seed-0_grpo.log").write_text(
        "$ /v/bin/python3 -m prefalign rl --model m --max-steps 32 --estimator grpo --heldout-prompts h.jsonl "
        "--heldout-judge arithmetic --heldout-every 4 --heldout-limit 32 --output /r/seed-0/grpo "
        "--overwrite\nrl: 100%\n"
    )
    assert critic_free.stage_command(tmp_path, "grpo") == ["rl", "--model", "m", "--estimator", "grpo"]
    with pytest.raises(SystemExit, match=r"seed-0_ppo.log: no such stage log"):
        critic_free.stage_command(tmp_path, "ppo")
    metrics = [
        {"wall_seconds": 4.0, "heldout/gold": 0.5, "time/heldout": 4.0},  # an evaluation's row: not an iteration
        {"wall_seconds": 9.0, "episodes": 16, "time/update": 5.0},
        {"wall_seconds": 12.0, "episodes": 32, "time/update": 2.0},
        {"wall_seconds": 16.0, "episodes": 48, "time/update": 3.0},
        {"wall_seconds": 18.0, "episodes": 64, "time/update": 1.0},
    ]
    fig = critic_free.iteration_figures(metrics)
    assert fig == {"s_per_iteration": 3.0, "episodes_per_iteration": 16, "s_per_episode": 3.0 / 16, "time/update": 2.0}


# ------------------------------------------------------------------------------------------- the GPU path


def test_parse_takes_device_model_and_interpreter_with_the_cpu_race_as_default(capsys):
    from bench.__main__ import parse

    args = parse([])
    assert (args.device, args.model, args.python_from_env, args.data) == ("cpu", None, False, None)
    args = parse(["--device", "cuda", "--model", "random-1b", "--python-from-env", "--data", "/d"])
    assert (args.device, args.model, args.python_from_env, args.data) == ("cuda", "random-1b", True, "/d")
    with pytest.raises(SystemExit, match=r"^2$"):
        parse(["--model", "random-7b"])
    assert "invalid choice: 'random-7b'" in capsys.readouterr().err


def test_device_cuda_without_a_gpu_is_refused_in_one_line_before_anything_is_written(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "bench", "--device", "cuda", "--out", str(tmp_path / "out")]
    done = subprocess.run(
        [*cmd, "--data", str(tmp_path / "data")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    [line] = lines
    assert line.startswith("python -m bench --device cuda: ") and "sees no CUDA device" in line
    assert "--python-from-env" in line  # the project venv holds the CPU torch: the line says what to do
    assert list(tmp_path.iterdir()) == []


def test_a_missing_interpreter_is_a_probe_error_not_a_traceback(tmp_path):
    from bench import device

    missing = tmp_path / "venv" / "bin" / "python"
    assert device.probe(missing) == {"error": f"{missing} could not run its probe: No such file or directory"}


def test_where_keeps_the_cpu_race_commands_and_names_the_gpu_race_ones():
    from bench import envs
    from bench.device import CPU, Where

    assert CPU.runner_args == [] and CPU.python("trl-1.16") == envs.venv_python("trl-1.16")
    assert CPU.data_dir == envs.BENCH_DIR / "data"  # where the CPU race's inputs always were
    gpu = Where(device="cuda", model="random-1b", from_env=True)
    assert gpu.runner_args == ["--device", "cuda"]
    assert gpu.python("trl-1.12") == gpu.python("prefalign") == Path(sys.executable)
    assert gpu.data_dir == envs.BENCH_DIR / "data-random-1b"  # each model keeps its own prepared inputs


def test_child_env_hides_the_gpu_on_cpu_and_passes_it_through_on_cuda(monkeypatch):
    from bench.__main__ import child_env

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    cpu = child_env(2, "dpo", "prefalign", "fp32")
    assert cpu["CUDA_VISIBLE_DEVICES"] == "" and cpu["OMP_NUM_THREADS"] == "2"
    assert "ACCELERATE_MIXED_PRECISION" not in cpu  # the orchestrator's accelerate settings never leak
    assert child_env(2, "dpo", "prefalign", "fp32", "cuda")["CUDA_VISIBLE_DEVICES"] == "1"  # the user's choice
    assert child_env(2, "ppo", "trl", "bf16", "cuda")["ACCELERATE_MIXED_PRECISION"] == "bf16"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert "CUDA_VISIBLE_DEVICES" not in child_env(2, "dpo", "prefalign", "fp32", "cuda")


def test_pick_model_falls_back_to_random_135m_on_a_gpu_without_the_default_weights(monkeypatch):
    from bench import device

    monkeypatch.setattr(device, "default_weights_present", lambda: False)
    model, note = device.pick_model(None, "cuda")
    assert model == "random-135m" and "not here" in note
    assert device.pick_model(None, "cpu") == ("default", None)  # the CPU race never changes model by itself
    assert device.pick_model("default", "cuda") == ("default", None)  # asked for: kept (prepare then says why not)
    monkeypatch.setattr(device, "default_weights_present", lambda: True)
    assert device.pick_model(None, "cuda") == ("default", None)


def test_a_baseline_without_its_trl_is_skipped_with_the_reason_only_from_the_env(monkeypatch):
    import importlib.metadata

    from bench.device import CPU, Where, skip_reason

    installed = {}

    def version(name):
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    env = Where(from_env=True)
    assert skip_reason("trl-1.16", env) == f"trl==1.16.0 is not installed in {sys.executable}"
    assert skip_reason("prefalign", env) is None  # the rollout baseline (model.generate) needs no TRL
    installed["trl"] = "1.17.0"
    assert skip_reason("trl-1.12", env) == f"trl==1.12.0 is not installed in {sys.executable} (it has trl 1.17.0)"
    installed["trl"] = "1.16.0"
    assert skip_reason("trl-1.16", env) is None
    assert skip_reason("trl-1.12", CPU) is None  # with venvs, the orchestrator builds it


def test_a_skipped_baseline_gets_our_row_with_its_reason():
    runs = [run(steps=(1, 2.0), rss_gib=1.0), run(workload="rollout8"), run(workload="rollout8", side="hf-generate")]
    skipped = {"dpo": "trl==1.16.0 is not installed in /py"}
    [solo] = report.solos(runs, {"dpo": 1}, skipped)
    assert (solo.workload, solo.precision, solo.ours.step_median) == ("dpo", "fp32", 2.0)
    comps = report.comparisons(runs, {"dpo": 1})
    assert [c.workload for c in comps] == ["rollout8"]  # no comparison for a one-sided workload
    lines = report.main_table(comps, 100, {"fp32": 1.0}, [solo]).splitlines()
    assert lines[-1].startswith("| dpo | fp32 | 2.00 [2.00–2.00] | – | 4.000 pairs/s | – | baseline skipped: trl==")
    assert lines[-1].count("|") == lines[0].count("|")
    assert report.solo_json(solo)["skipped"] == skipped["dpo"] and report.solo_json(solo)["ours"]["step_median"] == 2.0


def test_gpu_runs_compare_peak_gpu_memory_and_the_cpu_results_keep_their_fields():
    def gpu_run(side, gib):
        return {**run(side=side, steps=(1, 2.0)), "peak_gpu_bytes": gib * report.GIB_BYTES, "device": "cuda"}

    ours, base = report.figures([gpu_run("prefalign", 3.0)], 1), report.figures([gpu_run("trl", 6.0)], 1)
    c = report.compare("dpo", "bf16", ours, base)
    assert (ours.gpu_gib, c.gpu_ratio, c.gpu_met) == (3.0, 0.5, True)
    lines = report.main_table([c], 100, {"bf16": 1.0}, gpu=True).splitlines()
    assert "| peak GPU GiB prefalign / baseline | GPU mem × (target) | peak RSS GiB" in lines[0]
    assert "| 3.00 / 6.00 | **0.50** (≤ 0.5: met) | 2.00 / 2.00 |" in lines[2]
    assert lines[2].count("|") == lines[0].count("|") == 13
    assert report.comparison_json(c)["gpu_ratio"] == 0.5 and report.comparison_json(c)["ours"]["gpu_gib"] == 3.0
    cpu = report.compare("dpo", "fp32", report.figures([run()], 1), report.figures([run(side="trl")], 1))
    js = report.comparison_json(cpu)
    assert "gpu_ratio" not in js and "gpu_gib" not in js["ours"]  # a CPU race's results.json, field for field
    meta = {
        "stamp": "s",
        "command": "python -m bench --device cuda",
        "wall_seconds": 60.0,
        "threads": 16,
        "repeats": 1,
        "steps": {"dpo": 2},
        "warmup": {"dpo": 1},
        "peak_gflops": {"fp32": 5e4, "bf16": 7e5},
        "params": 1_073_809_408,
        "cpu": "host CPU",
        "versions": {"/py": {"torch": "2.11.0"}},
        "gpu": {"gpu": "NVIDIA H200", "gpu_memory_gib": 139.8, "torch": "2.11.0", "cuda_version": "13.0"},
        "model": "random-1b",
    }
    page = report.render(meta, [c], [gpu_run("prefalign", 3.0), gpu_run("trl", 6.0)])
    assert "GPU **NVIDIA H200** (139.8 GiB; torch 2.11.0, CUDA 13.0), host host CPU, model random-1b (1.07B" in page
    assert "GPU matmul peak (best of 7; fp32 without TF32, as both sides run it): fp32 50000.0 GFLOP/s" in page


def test_time_marks_and_the_prefalign_model_argument(tmp_path):
    from bench.common import StepClock, now, prefalign_model

    clock = StepClock()  # the CPU: no device to wait for
    clock.start()
    clock.mark()
    assert clock.device == "cpu" and 0 <= clock.seconds()[0] < 1 and now() >= clock.marks[0]
    assert prefalign_model(str(tmp_path)) == {}  # inputs prepared before model.json: the default
    (tmp_path / "model_path.txt").write_text("/cache/smollm2-135m")
    (tmp_path / "model.json").write_text(json.dumps({"name": "default", "params": 1}))
    assert prefalign_model(str(tmp_path)) == {}  # the configs' own default, as the CPU race always ran
    (tmp_path / "model_path.txt").write_text(str(tmp_path / "model"))
    (tmp_path / "model.json").write_text(json.dumps({"name": "random-1b", "params": 1}))
    assert prefalign_model(str(tmp_path)) == {"model": str(tmp_path / "model")}


def test_prepared_inputs_are_keyed_by_model(tmp_path, monkeypatch):
    import bench.__main__ as bench_main
    from bench.device import Where

    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd[2:])
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(bench_main.subprocess, "run", fake_run)
    where = Where(model="random-135m", data=tmp_path)
    bench_main.ensure_data(lambda m: None, where)
    bench_main.ensure_data(lambda m: None, where)  # prepared: nothing to do
    assert calls == [["bench.prepare", str(tmp_path), "64", "256", "random-135m"]]
    assert json.loads((tmp_path / "stamp.json").read_text())["model"] == "random-135m"
    bench_main.ensure_data(lambda m: None, Where(model="random-1b", data=tmp_path))  # another model: again
    bench_main.ensure_data(lambda m: None, Where(data=tmp_path))  # the default: its command as it always was
    assert calls[1:] == [["bench.prepare", str(tmp_path), "64", "256", "random-1b"], calls[0][:4]]


def test_portable_inputs_give_the_default_tokenizer_where_the_default_is_missing(tmp_path, monkeypatch):
    # a GPU machine has neither the default's weights nor ../shared: bench.prepare loads the tokenizer from the
    # copy through prefalign's load_tokenizer, which takes only a model directory (config.json)
    from bench import models
    from prefalign.models import load_tokenizer

    monkeypatch.setattr(models, "INPUTS", tmp_path / "inputs")
    monkeypatch.setattr(models, "HH_RLHF", tmp_path / models.HH_RLHF_NAME)  # copied along; its rows do not matter here
    models.HH_RLHF.write_bytes(b"")
    models.save_inputs(tmp_path / "inputs")
    monkeypatch.setattr(models, "default_weights_present", lambda: False)
    source = models.tokenizer_source()
    assert source == str(tmp_path / "inputs" / "tokenizer")
    tok, default = load_tokenizer(source), load_tokenizer(None)
    assert len(tok) == len(default) == 49152
    text = "Human: how do I bake bread?\n\nAssistant: Mix flour, water and yeast."
    assert tok(text)["input_ids"] == default(text)["input_ids"]
    assert (tok.eos_token_id, tok.pad_token_id) == (default.eos_token_id, default.pad_token_id)
    # a copy made before config.json was written is refused with the command that remakes it
    (tmp_path / "inputs" / "tokenizer" / "config.json").unlink()
    with pytest.raises(SystemExit, match="--save-inputs"):
        models.tokenizer_source()


def test_random_135m_has_the_default_models_exact_config():
    from bench.models import SMOLLM2_135M, random_config
    from prefalign.models import DEFAULT_MODEL, cache_dir

    config = random_config("random-135m").to_dict()
    cached = cache_dir() / DEFAULT_MODEL / "config.json"
    if not cached.is_file():
        pytest.skip("the default model was never converted on this machine")
    default = json.loads(cached.read_text())
    metadata = {"_model_name_or_path", "transformers_version", "architectures", "dtype"}
    assert {k: config.get(k) for k in default if k not in metadata} == {
        k: v for k, v in default.items() if k not in metadata
    }
    assert SMOLLM2_135M["vocab_size"] == default["vocab_size"] == 49152


def test_random_1b_is_a_1b_llama_on_the_default_vocabulary():
    import torch
    from transformers import LlamaForCausalLM

    from bench.models import random_config

    config = random_config("random-1b")
    shape = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads)
    assert shape == (2048, 16, 32, 8) and config.intermediate_size == 8192 and config.head_dim == 64
    assert config.tie_word_embeddings and config.vocab_size == 49152 and config.eos_token_id == 2
    with torch.device("meta"):  # counted without drawing 4 GB of weights
        params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert 0.9e9 <= params <= 1.3e9 and params == 1_073_809_408


def test_random_weights_are_the_seeds():
    from bench.models import build_random

    a, b = build_random("random-135m", seed=0).state_dict(), build_random("random-135m", seed=0).state_dict()
    assert a.keys() == b.keys() and all(torch_equal(a[k], b[k]) for k in a)
    other = build_random("random-135m", seed=1).state_dict()
    assert not torch_equal(a["model.layers.0.mlp.up_proj.weight"], other["model.layers.0.mlp.up_proj.weight"])
    assert sum(v.numel() for k, v in a.items() if k != "lm_head.weight") == 134_515_008  # the default's count


def torch_equal(x, y) -> bool:
    import torch

    return bool(torch.equal(x, y))


@pytest.mark.slow
def test_smoke_random_135m_from_the_env_on_the_cpu(tmp_path):
    """The whole path on a real (random) model: prepare writes it, both rollout sides load it, the table names it."""
    out, data = tmp_path / "out", tmp_path / "data"
    cmd = [sys.executable, "-m", "bench", "--quick", "--model", "random-135m", "--python-from-env"]
    cmd += ["--workloads", "rollout8", "--threads", "2", "--max-wait", "0", "--out", str(out), "--data", str(data)]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    meta = results["meta"]
    assert (meta["model"], meta["python_from_env"], meta["params"]) == ("random-135m", sys.executable, 134_515_008)
    assert "gpu" not in meta and "skipped" not in results  # the CPU, and rollout's baseline needs no TRL
    [c] = results["comparisons"]
    assert (c["workload"], c["precision"]) == ("rollout8", "fp32") and c["ours"]["tokens_per_s"] > 0
    assert "gpu_ratio" not in c and "gpu_gib" not in c["ours"]
    runs = [json.loads(line) for line in (out / "raw.jsonl").read_text().splitlines()]
    assert sorted(r["side"] for r in runs) == ["hf-generate", "prefalign"] and not any("device" in r for r in runs)
    assert json.loads((data / "model.json").read_text()) == {"name": "random-135m", "params": 134_515_008}
    assert (data / "model_path.txt").read_text() == str(data / "model")
    assert "model random-135m (0.13B parameters)" in (out / "results.md").read_text()


FAKE_PYTHON = """#!/usr/bin/env bash
# records each call; as `-m bench` it writes its --out's results.md and results.json (the model raced: --model, else
# FAKE_MODEL, the machine's pick) and exits 1 where --out ends in FAKE_FAIL
echo "PYTHONPATH=${PYTHONPATH:-} $*" >> "$CALLS"
[ "$2" = bench ] || exit 0
model=${FAKE_MODEL:-}
while [ $# -gt 0 ]; do
  case $1 in --model) model=$2 ;; --out) out=$2 ;; esac
  shift
done
mkdir -p "$out"
echo "table of $out" > "$out/results.md"
m=""
[ -n "$model" ] && m='"model": "'$model'"'
printf '{"meta": {%s}}\\n' "$m" > "$out/results.json"
[ -n "${FAKE_FAIL:-}" ] && [ "${out%$FAKE_FAIL}" != "$out" ] && exit 1
exit 0
"""


def run_gpu_sh(tmp_path, **env):
    # a copy of the script in a folder of its own: it runs from its repository root, here tmp_path/repo, where the
    # test decides which prepared models exist
    (tmp_path / "repo" / "bench").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "bench" / "gpu.sh", tmp_path / "repo" / "bench" / "gpu.sh")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    env = {**os.environ, "PYTHON": str(fake), "CALLS": str(calls), **env}
    env.pop("PYTHONPATH", None)
    script = tmp_path / "repo" / "bench" / "gpu.sh"
    done = subprocess.run(["bash", str(script), str(tmp_path / "out")], env=env, text=True, capture_output=True)
    return done, calls.read_text().splitlines()


def test_gpu_sh_runs_four_stages_each_with_its_trl_and_finishes_a_cut_run(tmp_path):
    wheels = tmp_path / "wheels"
    for folder in ("common", "trl116", "trl112"):
        (wheels / folder).mkdir(parents=True)
        (wheels / folder / f"{folder}-0-py3-none-any.whl").write_text("")
    done, calls = run_gpu_sh(tmp_path, WHEELS=str(wheels), FAKE_MODEL="random-135m")  # no default weights there
    assert done.returncode == 0, done.stderr
    installs, races = calls[:3], calls[3:]
    for line, folder in zip(installs, ("common", "trl116", "trl112")):
        assert f"--target /tmp/prefalign-wheels/{folder} {wheels}/{folder}/{folder}-0-py3-none-any.whl" in line
    site = "PYTHONPATH=/tmp/prefalign-wheels/trl{}:/tmp/prefalign-wheels/common -m"
    race = site + " bench --device cuda --python-from-env"
    levers = site.format(116) + " bench.rollout_levers --device cuda --model .bench/data-random-{}/model --batch 16 "
    levers += "--rounds 3 --variants hf-fp32,hf-bf16-weights,prefalign-generate-fp32,prefalign-loopnopack-fp32,"
    levers += "prefalign-loopunkeyed-fp32,prefalign-generate-bf16,prefalign-loopnopack-bf16,prefalign-loopunkeyed-bf16"
    out = tmp_path / "out"
    assert races == [
        f"{race.format(112)} --quick --steps 3 --precisions fp32,bf16 --workloads ppo --max-wait 0 "
        f"--out {out}/135m-ppo",
        f"{race.format(116)} --quick --steps 3 --precisions fp32,bf16 --workloads rollout16,dpo,grpo,reward,dpo_lora "
        f"--max-wait 0 --out {out}/135m",
        levers.format("135m"),
        f"{race.format(112)} --model random-1b --quick --steps 3 --precisions bf16 --workloads ppo --max-wait 0 "
        f"--out {out}/1b-ppo",
        f"{race.format(116)} --model random-1b --quick --steps 3 --precisions bf16 --workloads rollout16,dpo,grpo "
        f"--max-wait 0 --out {out}/1b",
        levers.format("1b"),
    ]
    assert (out / "levers-1b.txt").exists() and not list(out.glob("*.tmp"))
    stages = ("135m-ppo", "135m", "1b-ppo", "1b")
    assert (out / "results.md").read_text().split("\n")[:4] == [f"table of {out}/{s}" for s in stages]
    assert [(out / s / "rc").read_text() for s in stages] == ["0\n"] * 4


def test_gpu_sh_races_again_only_a_stage_that_failed_or_never_ended(tmp_path):
    out = tmp_path / "out"
    done, _ = run_gpu_sh(tmp_path, FAKE_FAIL="/135m", LEVERS="0")  # a failed run in the 135m stage
    assert done.returncode == 1 and (out / "135m" / "rc").read_text() == "1\n"
    assert "135m: exit status 1" in done.stderr
    (out / "1b" / "rc").unlink()  # as if the deadline's timeout had stopped it before its status was written
    done, calls = run_gpu_sh(tmp_path, STEPS="4", LEVERS="0")
    assert done.returncode == 0 and done.stderr.count("done in an earlier run") == 2
    race = "PYTHONPATH= -m bench --device cuda --python-from-env"
    assert calls == [
        f"{race} --quick --steps 4 --precisions fp32,bf16 --workloads rollout16,dpo,grpo,reward,dpo_lora --max-wait 0 "
        f"--out {out}/135m",
        f"{race} --model random-1b --quick --steps 4 --precisions bf16 --workloads rollout16,dpo,grpo --max-wait 0 "
        f"--out {out}/1b",
    ]


def test_gpu_sh_levers_time_the_default_where_the_race_had_its_weights(tmp_path):
    done, calls = run_gpu_sh(tmp_path, WORKLOADS_135M="dpo")  # FAKE_MODEL unset: the race named no random model
    assert done.returncode == 0, done.stderr
    levers = [c for c in calls if "bench.rollout_levers" in c]
    assert len(levers) == 2 and "--model" not in levers[0]
    assert "--model .bench/data-random-1b/model" in levers[1]


def test_gpu_sh_starts_no_stage_past_its_deadline(tmp_path):
    done, calls = run_gpu_sh(tmp_path, DEADLINE="30")
    assert done.returncode == 1 and calls == []
    assert done.stderr.count("not started, ") == 6  # four stages, and the levers of two shapes with no results
    assert re.search(r"135m-ppo: not started, (30|29) s left", done.stderr)
    done, calls = run_gpu_sh(tmp_path, DEADLINE="9m")
    assert done.returncode == 2 and calls == [] and "DEADLINE=9m: give whole seconds" in done.stderr


def test_gpu_wheels_pin_the_project_venvs_versions_and_keep_each_trl_apart(tmp_path):
    from bench import envs

    versions = {p: f"{i}.0" for i, p in enumerate(envs.GPU_WHEELS)}
    cmds = envs.gpu_wheel_commands(tmp_path, versions, "3.12")
    by_dest = {c[c.index("--dest") + 1]: c[c.index("--dest") + 2 :] for c in cmds}
    assert by_dest == {
        str(tmp_path / "common"): [f"{p}=={i}.0" for i, p in enumerate(envs.GPU_WHEELS)],
        str(tmp_path / "trl116"): ["trl==1.16.0"],
        str(tmp_path / "trl112"): ["trl==1.12.0"],
    }
    for c in cmds:  # wheels for the GPU machine's interpreter, not this one's, and nothing pulled in unpinned
        assert c[c.index("--python-version") + 1] == "3.12" and "--no-deps" in c and "--only-binary=:all:" in c
        assert "manylinux_2_17_x86_64" in c and "transformers" in " ".join(cmds[0])


def test_rollout_levers_unkeyed_variant_runs_on_a_model_directory(tiny_model_dir, capsys):
    # the variant that prices keyed sampling, on any model directory (a GPU machine has only random ones), and the
    # loop on the fused Llama step against one pack per linear
    import torch

    from bench import rollout_levers

    variants = "prefalign-loopnopack-fp32,prefalign-loopunkeyed-fp32,prefalign-loopunfused-fp32,prefalign-loop-fp32"
    threads = str(torch.get_num_threads())  # main sets the process's threads: keep this test process's
    argv = [
        "--model",
        str(tiny_model_dir),
        "--variants",
        variants,
        "--calls",
        "2",
        "--batch",
        "3",
        "--threads",
        threads,
    ]
    rollout_levers.main(argv)
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [next(iter(r)) for r in rows] == variants.split(",")
    for r in rows:
        row = next(iter(r.values()))
        assert len(row["tokens"]) == 2 and all(0 < n <= 3 * rollout_levers.NEW_TOKENS for n in row["tokens"])


def test_rollout_levers_unkeyed_draws_from_the_tempered_softmax():
    import torch

    from bench.rollout_levers import unkeyed

    torch.manual_seed(0)
    scores = torch.tensor([[0.0, 30.0, 0.0], [1.0, 0.0, 0.0]]).repeat(20000, 1)
    tokens = unkeyed(scores, 0).view(20000, 2)
    assert (tokens[:, 0] == 1).all()  # a 30-logit gap at temperature 0.7: certain
    p0 = 1 / (1 + 2 * torch.exp(torch.tensor(-1 / 0.7)))  # softmax of [1, 0, 0] / 0.7 at token 0: 0.676
    assert abs((tokens[:, 1] == 0).float().mean() - p0) < 0.015  # 4.5 binomial standard deviations


def test_rollout_levers_refuses_cuda_without_a_gpu(monkeypatch):
    import torch

    from bench import rollout_levers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cuda: this torch sees no CUDA device"):
        rollout_levers.main(["--device", "cuda"])


def test_lever_experiments_patch_what_they_name_and_refuse_others(monkeypatch):
    import torch

    import prefalign.models.lean as lean
    import prefalign.trainers.ppo as ppo
    from bench import levers
    from bench.run_prefalign import apply_experiments
    from prefalign.trainers import backend, loop
    from prefalign.trainers.ppo_update import PPOUpdate

    monkeypatch.setattr(loop.Trainer, "longest_first", loop.Trainer.longest_first)  # undone after the test
    monkeypatch.setattr(ppo, "release_sampling_copy", ppo.release_sampling_copy)
    monkeypatch.setattr(backend, "sparse_embedding_backward", backend.sparse_embedding_backward)
    monkeypatch.setattr(PPOUpdate, "minibatch_step", PPOUpdate.minibatch_step)
    policy_first = PPOUpdate.minibatch_step
    examples = [("short", 1), ("long", 2)]
    monkeypatch.setattr(lean, "_rebuilt_from_norm_inputs", lean._rebuilt_from_norm_inputs)
    named = ["chunks_in_data_order", "keep_sampling_copy", "dense_embedding_backward", "joint_ppo_step"]
    apply_experiments([*named, "norm_outputs_kept"])
    assert PPOUpdate.minibatch_step is not policy_first
    assert loop.Trainer.longest_first(None, examples) is examples
    model = torch.nn.Linear(2, 2)
    ppo.release_sampling_copy(model, None)  # kept: not freed
    assert model.weight.numel() == 4
    table = torch.nn.Embedding(4, 2)
    table.get_input_embeddings = lambda: table
    assert backend.sparse_embedding_backward(table) == [] and not table.sparse  # the dense backward, as before
    y = torch.ones(2, requires_grad=True) * 2
    y._lean_norm_inputs = (torch.ones(2), torch.ones(2), torch.ones(1))
    assert isinstance(lean._rebuilt_from_norm_inputs(y), contextlib.nullcontext)  # the GEMMs keep it, as before
    with pytest.raises(SystemExit, match="unknown --exp 'nope'"):
        apply_experiments(["nope"])
    # every study's flags are --set or a known --exp
    extras = [extra for *_, variants in levers.STUDIES.values() for *_, extra in variants]
    assert all(set(extra[0::2]) <= {"--set", "--exp"} for extra in extras)
    exps = {v for extra in extras for f, v in zip(extra[0::2], extra[1::2]) if f == "--exp"}
    assert exps == {
        "fused_adamw",
        "chunks_in_data_order",
        "keep_sampling_copy",
        "dense_embedding_backward",
        "joint_ppo_step",
        "norm_outputs_kept",
    }


def test_every_workload_times_a_step_past_its_warm_up(capsys):
    """PPO drops its first two iterations: --steps 2 (or --quick's old 2) timed none of them, and the report then
    counted the warm-up as timed."""
    from bench.__main__ import QUICK_STEPS, STEPS, WARMUP, parse

    assert all(steps[w] > WARMUP[w] for steps in (STEPS, QUICK_STEPS) for w in steps)
    with pytest.raises(SystemExit):
        parse(["--workloads", "dpo,ppo", "--steps", "2"])
    assert "--steps must be in [3, 8] here: the warm-up steps and a timed one at least" in capsys.readouterr().err
    assert parse(["--workloads", "dpo", "--steps", "2"]).steps == 2
