"""The whole experiment: pairs from the starting policy, every arm trained on them, every policy
evaluated on held-out prompts by the gold judge, costs measured, a report written.

Layout of ``--output DIR``::

    prompts/train.jsonl, prompts/heldout.jsonl    the prompts used (written once)
    pairs/                                         `prefalign prefs` run: pairs.jsonl (shared by every arm)
    seed-S/rm, seed-S/ppo, seed-S/dpo, ...         one training run per arm and seed
    seed-S/eval/                                   `prefalign eval` of every arm and the starting policy
    logs/                                          each stage's output (NAME.log; NAME.progress.json while it runs)
    stages.json                                    wall time and peak memory of finished stages
    report.md, report.html, summary.json, *.png    the report
    tensorboard/ (trackio/, wandb/)                the race's results table, for --report-to

The arms are a table (`prefalign.compare.arms`); `plan` turns it into stage command lines, `stages` runs
and measures them, `summary` reads the finished runs back, `prefalign.eval.report` writes the report.
"""

from __future__ import annotations

from pathlib import Path

from prefalign.compare.config import CompareConfig
from prefalign.compare.plan import plan_stages
from prefalign.compare.progress import RaceProgress
from prefalign.compare.stages import StageRunner
from prefalign.compare.summary import log_summary, summarize
from prefalign.compare.tasks import TASKS
from prefalign.errors import UserError
from prefalign.preflight import preflight_race
from prefalign.runio import CONFIG_FILE, claimed_output_dir, write_config, write_jsonl
from prefalign.trackers import load_tracker_packages


def _prompts(source: str | None, resource: str, count: int, tokenizer) -> list[dict]:
    """The first ``count`` prompt rows of ``source`` (default: the packaged file ``resource``), each with every
    column of its row: the judge of every stage reads them (the arithmetic judge its ``answer``)."""
    from prefalign.data import load_prompt_rows
    from prefalign.resources import resource_path

    prompts, columns = load_prompt_rows(resource_path(resource) if source is None else source, tokenizer)
    seen: dict[str, int] = {}
    for n, prompt in enumerate(prompts[:count], start=1):
        if (first := seen.setdefault(prompt, n)) != n:  # the evaluation pairs policies by prompt text
            raise UserError(
                f"{source or f'packaged {resource}'}: prompt {n} repeats prompt {first} ({prompt[:40]!r}); "
                "give each prompt once"
            )
    if len(prompts) < count:
        raise UserError(
            f"{source or f'packaged {resource}'}: {len(prompts)} prompts, fewer than the {count} "
            "asked for; lower --num-prompts / --eval-prompts or give more prompts"
        )
    return [
        {"prompt": prompt, **{name: values[i] for name, values in columns.items()}}
        for i, prompt in enumerate(prompts[:count])
    ]


class Comparison:
    def __init__(self, cfg: CompareConfig):
        self.user_cfg = cfg
        self.cfg = cfg.resolved()

    def run(self) -> dict:
        """Run every stage not finished before, then summarise and write the report; returns the summary.

        The race holds its output directory's lock throughout (each stage locks its own directory); a failed
        race keeps its directory, to be resumed."""
        cfg = self.cfg
        if cfg.resume and not (Path(cfg.output) / CONFIG_FILE).is_file():  # written as a race starts
            raise UserError(f"--resume: {cfg.output} holds no comparison to resume; drop --resume to start one there")
        # before the directory exists; the plan's prompt paths are placeholders: only its commands are counted
        stages = plan_stages(cfg, Path(cfg.output), Path("train.jsonl"), Path("heldout.jsonl"))
        preflight_race(cfg.output, [stage.command for stage in stages], cfg.model)
        load_tracker_packages(cfg.trackers, cfg.output)  # a missing extra stops the race, not its first trainer
        rows = self._prompt_rows()  # a bad --model or prompt file stops the race before its directory exists
        with claimed_output_dir(cfg.output, overwrite=cfg.overwrite, resume=cfg.resume, keep_on_error=True) as out:
            return self._race(out, rows)

    def _race(self, out: Path, rows: tuple[list[dict], list[dict]] | None) -> dict:
        from prefalign.eval.report import write_report

        cfg = self.cfg
        write_config(out, self.user_cfg)
        write_config(out / "resolved", cfg)
        train_prompts, heldout_prompts = self._write_prompts(out, rows)
        plan = plan_stages(cfg, out, train_prompts, heldout_prompts)
        with RaceProgress(plan) as race:  # closed before an error propagates: the error stays the last line
            runner = StageRunner(out, resume=cfg.resume, monitor=race)
            results = {stage.name: runner.run(stage.name, stage.command, stage.args) for stage in plan}
        summary = summarize(cfg, out, results)
        write_report(summary, out)
        log_summary(cfg, out, summary)
        return summary

    def _prompt_rows(self) -> tuple[list[dict], list[dict]] | None:
        """The training and held-out prompt rows (the task's packaged ones unless given), every column kept; a
        built-in or callable judge that needs a column the rows lack (the arithmetic judge's ``answer``) is refused
        here, not in the first stage. None on --resume of a race that wrote its prompts: it keeps those (its
        prompt files need not still exist)."""
        from prefalign.models import load_tokenizer
        from prefalign.reward_mix import check_reward_columns
        from prefalign.rewards import check_reward_model_name, is_reward_model, load_reward_source

        cfg = self.cfg
        tokenizer = load_tokenizer(cfg.model)  # also stops on a bad --model
        if cfg.resume and _prompt_files(Path(cfg.output))[0].exists():
            return None
        task = TASKS[cfg.task]
        train = _prompts(cfg.train_prompts, task.train, cfg.num_prompts, tokenizer)
        heldout = _prompts(cfg.heldout_prompts, task.heldout, cfg.eval_prompts, tokenizer)
        if is_reward_model(cfg.judge):  # not loaded here only to be loaded again per stage: its name is checked
            check_reward_model_name(cfg.judge)
        else:
            judge = load_reward_source(cfg.judge)
            for rows in (train, heldout):
                check_reward_columns(judge, {name: [] for name in rows[0] if name != "prompt"})
        return train, heldout

    def _write_prompts(self, out: Path, rows: tuple[list[dict], list[dict]] | None) -> tuple[Path, Path]:
        """``rows`` as the files every stage reads (None: the files a resumed race wrote, kept as they are)."""
        train_prompts, heldout_prompts = _prompt_files(out)
        if rows is not None:
            train_prompts.parent.mkdir(exist_ok=True)
            write_jsonl(train_prompts, rows[0])
            write_jsonl(heldout_prompts, rows[1])
        return train_prompts, heldout_prompts


def _prompt_files(out: Path) -> tuple[Path, Path]:
    """The training and held-out prompt files of the race in ``out``."""
    return out / "prompts" / "train.jsonl", out / "prompts" / "heldout.jsonl"
