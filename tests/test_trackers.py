"""--report-to: a tiny run with each tracker writes the tracker's local files inside --output, holding exactly the
scalars metrics.jsonl holds; none writes no tracker file; a bad name or a missing extra is one line; compare hands
the flag to every training stage and logs its results table. Offline throughout: wandb offline, trackio local."""

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import learnable_pairs, read_metrics, trainer_kwargs, write_jsonl

from prefalign.cli._args import parse
from prefalign.compare import CompareConfig
from prefalign.compare.plan import plan_stages
from prefalign.compare.summary import log_summary
from prefalign.errors import UserError
from prefalign.trackers import TrackedRun, load_tracker_packages, open_trackers, parse_report_to
from prefalign.trainers.dpo import DPOConfig, DPOTrainer

TRACKER_FILES = ("tensorboard", "trackio", "wandb")
TRAINERS = {"sft", "dpo", "reward", "ppo", "rl"}
BAD_NAME = r"^--report-to takes a comma list of tensorboard, trackio, wandb \(or none alone\), got "


@pytest.fixture(scope="session")
def shared_trackio_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("trackio")


@pytest.fixture(autouse=True)
def offline_defaults(monkeypatch, shared_trackio_dir):
    """No user tracker settings leak in; every in-process trackio run of this session shares one TRACKIO_DIR
    (trackio reads it once, at its first import: the subprocess test checks the default, OUT/trackio)."""
    for key in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TRACKIO_DIR", str(shared_trackio_dir))


def finite_by_step(rows: list[dict]) -> dict[int, dict[str, float]]:
    """metrics.jsonl's rows merged per step, numbers only (what every tracker is handed; NaN is a string there)."""
    merged: dict[int, dict[str, float]] = {}
    for row in rows:
        merged.setdefault(row["step"], {}).update(
            {k: v for k, v in row.items() if k not in ("step", "wall_seconds") and isinstance(v, (int, float))}
        )
    return merged


def tensorboard_scalars(log_dir: Path) -> dict[int, dict[str, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    merged: dict[int, dict[str, float]] = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            merged.setdefault(event.step, {})[tag] = event.value
    return merged


def trackio_rows(db: Path, run_name: str) -> list[tuple[int, dict]]:
    with sqlite3.connect(db) as connection:
        rows = connection.execute("SELECT step, metrics FROM metrics WHERE run_name = ? ORDER BY id", (run_name,))
        return [(step, json.loads(metrics)) for step, metrics in rows]


def wandb_records(path: Path):
    """The protobuf records of a ``.wandb`` file: a 7-byte header, then LevelDB's log format (32 KiB blocks of
    chunks: crc32, little-endian length, type 1 FULL / 2 FIRST / 3 MIDDLE / 4 LAST)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(out: Path) -> dict[int, dict[str, float]]:
    """The scalars of the one offline wandb run in ``out/wandb``, merged per step (wandb's own ``_`` keys left out)."""
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    merged: dict[int, dict[str, float]] = {}
    for record in wandb_records(next(run_dir.glob("run-*.wandb"))):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            merged.setdefault(items["_step"], {}).update({k: v for k, v in items.items() if not k.startswith("_")})
    return merged


def test_a_tiny_run_with_each_tracker_writes_its_files_inside_output(tmp_path, tiny_model_dir):
    """One dpo run (with an evaluation at step 0 and one sharing the last step) into all three trackers; HOME and
    HF_HOME point at an empty directory and TRACKIO_DIR is unset, so any file a tracker wrote outside --output
    would show there."""
    data, out, home = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(16)), tmp_path / "run", tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "HF_HOME": str(home / "hf"), "XDG_CACHE_HOME": str(home / "cache")}
    env.pop("TRACKIO_DIR")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefalign",
            "dpo",
            "--data",
            str(data),
            "--model",
            str(tiny_model_dir),
            "--output",
            str(out),
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--eval-split",
            "0.25",
            "--precision",
            "fp32",
            "--report-to",
            "tensorboard,trackio,wandb",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    expected = finite_by_step(read_metrics(out))
    assert sorted(expected) == [0, 1, 2] and "eval/loss" in expected[2] and "loss" in expected[2]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    tensorboard = tensorboard_scalars(out / "tensorboard")
    assert tensorboard.keys() == expected.keys()
    for step, scalars in expected.items():
        assert tensorboard[step] == pytest.approx(scalars, rel=1e-6)  # event files hold float32
    trackio: dict[int, dict] = {}
    for step, metrics in trackio_rows(out / "trackio" / "prefalign.db", str(out)):
        trackio.setdefault(step, {}).update(metrics)
    assert trackio == expected
    assert wandb_history(out) == expected
    assert [p for p in home.rglob("*") if "wandb" in p.name or "trackio" in p.name] == []


def test_none_writes_no_tracker_files_but_metrics_jsonl(tmp_path, tiny_model_dir, pairs):
    out = tmp_path / "run"
    DPOTrainer(DPOConfig(**trainer_kwargs(tmp_path, tiny_model_dir, pairs, max_steps=2, report_to="none"))).train()
    assert [row["step"] for row in read_metrics(out)] == [1, 2]
    assert [name for name in TRACKER_FILES if (out / name).exists()] == []


def test_a_table_reaches_every_tracker(tmp_path):
    """What PPO's samples take: a table beside the scalars, in each tracker's own form."""
    out = tmp_path / "run"
    out.mkdir()
    rows = [
        {"step": 3, "prompt": "a | b", "completion": "c", "score": 0.5},
        {"step": 3, "prompt": "d", "completion": "e\nf", "score": -1.0},
    ]
    for tracker in open_trackers(("tensorboard", "trackio", "wandb"), TrackedRun(out, str(out), {"seed": 0})):
        tracker.log(3, {"loss": 0.25})
        tracker.log_table(3, "samples", rows)
        tracker.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    (text,) = events.Tensors("samples/text_summary")
    assert text.tensor_proto.string_val[0].decode() == (
        "| step | prompt | completion | score |\n|---|---|---|---|\n| 3 | a \\| b | c | 0.5 |\n| 3 | d | e f | -1.0 |"
    )
    trackio = trackio_rows(Path(os.environ["TRACKIO_DIR"]) / "prefalign.db", str(out))
    assert trackio[0] == (3, {"loss": 0.25})
    assert trackio[1][1]["samples"]["_value"] == rows
    (table,) = (out / "wandb").glob("offline-run-*/files/media/table/samples_3_*.table.json")
    assert json.loads(table.read_text()) == {
        "columns": ["step", "prompt", "completion", "score"],
        "data": [[3, "a | b", "c", 0.5], [3, "d", "e\nf", -1.0]],
    }
    assert wandb_history(out)[3]["loss"] == 0.25


@pytest.mark.parametrize(
    "value, names",
    [
        ("tensorboard", ("tensorboard",)),
        ("none", ()),
        (" wandb , trackio", ("wandb", "trackio")),
        ("wandb,wandb", ("wandb",)),
    ],
)
def test_report_to_parses_a_comma_list(value, names):
    assert parse_report_to(value) == names


@pytest.mark.parametrize("value", ["tensorbord", "none,wandb", "", "tensorboard,", "TensorBoard", "all"])
def test_a_bad_report_to_is_one_line_naming_the_choices(value, tmp_path, pairs):
    with pytest.raises(ValueError, match=BAD_NAME + re.escape(repr(value)) + "$"):
        DPOConfig(**trainer_kwargs(tmp_path, "tiny", pairs, report_to=value))
    with pytest.raises(ValueError, match=BAD_NAME):
        CompareConfig(report_to=value)
    with pytest.raises(UserError, match=BAD_NAME + "'tensorbord'$"):
        parse(DPOConfig, ["--data", str(pairs), "--report-to", "tensorbord"], prog="prefalign dpo")


@pytest.mark.parametrize("package", ["trackio", "wandb"])
def test_a_missing_extra_stops_the_run_before_anything_is_written(
    package, monkeypatch, tmp_path, tiny_model_dir, pairs
):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now fails as if it were not installed
    monkeypatch.delitem(sys.modules, f"{package}.utils", raising=False)
    cfg = DPOConfig(**trainer_kwargs(tmp_path, tiny_model_dir, pairs, report_to=f"tensorboard,{package}"))
    with pytest.raises(
        UserError,
        match=rf"^--report-to {package} needs the {package} package: "
        rf"pip install 'prefalign\[{package}\]'$",
    ):
        DPOTrainer(cfg).train()
    assert not (tmp_path / "run").exists()


def test_trackio_imported_for_another_directory_is_refused(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "trackio.utils", SimpleNamespace(TRACKIO_DIR=tmp_path / "elsewhere"))
    monkeypatch.delenv("TRACKIO_DIR")
    with pytest.raises(
        UserError,
        match=rf"^--report-to trackio: trackio already writes to {tmp_path}/elsewhere in "
        rf"this process, not {tmp_path}/run/trackio; run each run in its own process",
    ):
        load_tracker_packages(("trackio",), tmp_path / "run")


def test_a_resumed_wandb_run_continues_the_newest_run_id(tmp_path):
    from prefalign.trackers import _wandb_run_id

    assert _wandb_run_id(tmp_path) is None
    for name in ("offline-run-20260101_100000-aaaa1111", "offline-run-20260102_090000-bbbb2222", "latest-run", "cache"):
        (tmp_path / "wandb" / name).mkdir(parents=True)
    assert _wandb_run_id(tmp_path) == "bbbb2222"


def test_compare_hands_report_to_to_every_training_stage_only():
    out = Path("OUT")
    for value, flag in (("tensorboard", []), ("trackio,wandb", ["--report-to", "trackio,wandb"])):
        cfg = CompareConfig(report_to=value, arms=["ppo", "dpo", "grpo"], sweep=True, seeds=2).resolved()
        plan = plan_stages(cfg, out, out / "train.jsonl", out / "heldout.jsonl")
        assert {stage.command for stage in plan} == TRAINERS - {"sft"} | {"prefs", "eval"}
        for stage in plan:
            positions = [i for i, arg in enumerate(stage.args) if arg == "--report-to"]
            given = [arg for i in positions for arg in stage.args[i : i + 2]]
            assert given == (flag if stage.command in TRAINERS else []), stage.name


def test_compare_logs_its_results_table(tmp_path):
    out = tmp_path / "race"
    out.mkdir()
    summary = {
        "arms": [
            {"name": "start", "eval": {"gold_mean": 0.1, "kl_mean": 0.0, "win_rate": None}},
            {
                "name": "dpo",
                "eval": {"gold_mean": 0.4, "kl_mean": 1.5, "win_rate": 0.75},
                "cost": {"wall_seconds": {"total": 12.5}},
            },
        ]
    }
    log_summary(CompareConfig(output=str(out), report_to="wandb"), out, summary)
    (table,) = (out / "wandb").glob("offline-run-*/files/media/table/results_0_*.table.json")
    assert json.loads(table.read_text()) == {
        "columns": ["arm", "gold_mean", "kl_mean", "win_rate", "wall_seconds"],
        "data": [["start", 0.1, 0.0, None, None], ["dpo", 0.4, 1.5, 0.75, 12.5]],
    }
    log_summary(CompareConfig(output=str(tmp_path / "quiet"), report_to="none"), tmp_path / "quiet", summary)
    assert not (tmp_path / "quiet").exists()


def trackio_log(out: Path) -> list[tuple[int, str]]:
    """(step, metric) of every metric trackio holds for the run ``out``, in the order written (tables left out)."""
    db = Path(os.environ["TRACKIO_DIR"]) / "prefalign.db"
    return [(step, k) for step, metrics in trackio_rows(db, str(out)) for k in metrics if k != "samples"]


def kill_and_resume(out: Path, first: list, resumed: list, resume_step: int = 2, trackers=(("trackio",),) * 2):
    """A run logs ``first`` ((step, metrics) or (step, "table")), is killed, and resumes at ``resume_step`` to log
    ``resumed``: the two loggers a killed and a resumed run open, with ``trackers`` (the killed run's, the
    resumed run's)."""
    from prefalign.trainers.metrics import MetricsLogger

    for calls, resume in ((first, None), (resumed, resume_step)):
        logger = MetricsLogger(
            out, resume_step=resume, trackers=trackers[0 if resume is None else 1], run_name=str(out)
        )
        for step, what in calls:
            if what == "table":
                logger.log_table(step, "samples", [{"prompt": "a", "completion": "b"}])
            else:
                logger.log(step, what)
        logger.close()


def test_a_resumed_run_does_not_log_again_what_trackio_holds(tmp_path):
    """Killed after logging steps 1-4 with its checkpoint at step 2, the run resumes and logs 3 and 4 again (as an
    exact resume recomputes them) and 5: metrics.jsonl and trackio each hold every step once, TensorBoard too."""
    out = tmp_path / "run"
    out.mkdir()
    loss = {step: {"loss": 1.0 / step} for step in range(1, 6)}
    both = ("trackio", "tensorboard")
    first = [(1, loss[1]), (2, loss[2]), (3, loss[3]), (4, "table"), (4, loss[4])]
    kill_and_resume(out, first, [(3, loss[3]), (4, "table"), (4, loss[4]), (5, loss[5])], trackers=(both, both))
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]
    assert trackio_log(out) == [(1, "loss"), (2, "loss"), (3, "loss"), (4, "loss"), (5, "loss")]
    db = Path(os.environ["TRACKIO_DIR"]) / "prefalign.db"
    assert [step for step, metrics in trackio_rows(db, str(out)) if "samples" in metrics] == [4]
    assert sorted(tensorboard_scalars(out / "tensorboard")) == [1, 2, 3, 4, 5]


def test_a_resumed_run_sends_trackio_what_it_does_not_hold(tmp_path):
    """What the resumed run logs at an already-logged step under another name (the final evaluation of a run killed
    during it), at steps the killed run did not log (another --logging-steps), at steps trackio lost (its writer
    thread died with the process), and everything to a tracker the killed run did not have."""
    out = tmp_path / "run"
    out.mkdir()
    row = lambda step: {"loss": 1.0 / step}  # noqa: E731
    kill_and_resume(out, [(2, row(2)), (4, row(4))], [(3, row(3)), (4, row(4)), (4, {"eval/loss": 0.5})])
    assert trackio_log(out) == [(2, "loss"), (4, "loss"), (3, "loss"), (4, "eval/loss")]

    lost = tmp_path / "lost"
    lost.mkdir()
    kill_and_resume(lost, [(2, row(2)), (3, row(3)), (4, row(4))], [])
    db = Path(os.environ["TRACKIO_DIR"]) / "prefalign.db"
    with sqlite3.connect(db) as connection:  # the last row never reached the database
        connection.execute("DELETE FROM metrics WHERE run_name = ? AND step = 4", (str(lost),))
    (lost / "metrics.jsonl").write_text("".join(json.dumps({"step": s, **row(s)}) + "\n" for s in (2, 3, 4)))
    kill_and_resume(lost, [], [(3, row(3)), (4, row(4))], resume_step=2)
    assert trackio_log(lost) == [(2, "loss"), (3, "loss"), (4, "loss")]

    added = tmp_path / "added"
    added.mkdir()
    kill_and_resume(
        added, [(2, row(2)), (3, row(3))], [(3, row(3)), (4, row(4))], trackers=(("tensorboard",), ("trackio",))
    )
    assert trackio_log(added) == [(3, "loss"), (4, "loss")]


def test_wandb_style_trackers_skip_only_what_they_hold():
    from prefalign.trackers import _WandbStyleTracker

    calls = []
    tracker = _WandbStyleTracker()
    tracker.run = SimpleNamespace(log=lambda values, step: calls.append((step, sorted(values))))
    tracker.module = SimpleNamespace(Table=lambda columns, data: (columns, data))
    tracker.held = {3: frozenset({"loss"}), 4: frozenset({"loss", "lr"})}
    for step in (3, 4, 5):
        tracker.log_table(step, "samples", [{"prompt": "a"}])
        tracker.log(step, {"loss": 1.0, "lr": 0.1})
        tracker.log(step, {"eval/loss": 1.0})
    assert calls == [
        (3, ["lr"]),
        (3, ["eval/loss"]),
        (4, ["eval/loss"]),
        (5, ["samples"]),
        (5, ["loss", "lr"]),
        (5, ["eval/loss"]),
    ]


def test_the_resume_cut_hands_the_trackers_what_the_killed_run_logged_per_step(tmp_path):
    from prefalign.trainers.metrics import MetricsLogger

    out = tmp_path / "run"
    out.mkdir()
    rows = [
        {"step": 1, "loss": 1},
        {"step": 3, "loss": 1},
        {"step": 4, "loss": 1, "lr": 1},
        {"step": 4, "eval/loss": 1},
    ]
    (out / "metrics.jsonl").write_text("".join(json.dumps({**r, "wall_seconds": 1.0}) + "\n" for r in rows))
    seen = []
    import prefalign.trainers.metrics as metrics

    original = metrics.open_trackers
    metrics.open_trackers = lambda names, run: seen.append(run) or []
    try:
        MetricsLogger(out, resume_step=2, trackers=("wandb",))
    finally:
        metrics.open_trackers = original
    assert seen[0].logged_after_checkpoint == {3: {"loss"}, 4: {"loss", "lr", "eval/loss"}}
