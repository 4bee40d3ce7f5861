"""What a training command tells the user: each config field's doc in --help, and the rows it dropped."""

import ast
import dataclasses
import inspect
import itertools
import json
import re

import pytest
from conftest import learnable_pairs, run_cli, write_jsonl


def field_docs(cls) -> dict[str, str]:
    """``{field: docstring}`` of a config dataclass and its bases (the string literal under each field)."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for stmt, after in itertools.pairwise(body):
            documented = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
            if isinstance(stmt, ast.AnnAssign) and documented:
                docs[stmt.target.id] = after.value.value
    return docs


def test_dpo_help_shows_every_field_with_its_doc():
    from prefalign.trainers.dpo import DPOConfig

    r = run_cli("dpo", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.replace("│", " ").split())  # undo the help box and its line wrapping
    docs = field_docs(DPOConfig)
    assert {"beta", "data", "data_split", "learning_rate", "lora_r"} <= set(docs)
    undocumented = [f.name for f in dataclasses.fields(DPOConfig) if f.name not in docs]
    assert not undocumented, f"fields without a docstring: {undocumented}"
    for name, doc in docs.items():
        flag = "--" + name.replace("_", "-")
        assert re.search(re.escape(flag) + r"(?![\w-])", text), flag  # --data, not only --data-split
        assert " ".join(doc.split()) in text, (flag, doc)
    assert "Split of --data when it is a hub dataset id" in text


def test_reflow_joins_lines_and_keeps_paragraphs_and_list_items():
    from prefalign.cli._args import reflow_docstring

    doc = "First line of a field,\n    --its-flag (0: off)\n    ends here.\n\n    Second:\n    - one item\n    - two"
    assert (
        reflow_docstring(doc) == "First line of a field, --its-flag (0: off) ends here.\n\nSecond:\n- one item\n- two"
    )


@pytest.mark.parametrize("config", ["prefalign.trainers.dpo:DPOConfig", "prefalign.trainers.rl_config:RLConfig"])
def test_help_gives_each_field_doc_as_one_paragraph(config, monkeypatch, capsys):
    """tyro kept every source line break of a field's docstring (its continuation lines start indented), so --help
    broke mid-sentence ("a CPU with bf16" / "instructions"); on a wide terminal each doc is now one line."""
    import importlib

    from prefalign.cli._args import parse

    module, name = config.split(":")
    cls = getattr(importlib.import_module(module), name)
    monkeypatch.setenv("COLUMNS", "2000")
    with pytest.raises(SystemExit, match="0"):
        parse(cls, ["--help"], prog="prefalign x")
    lines = [" ".join(line.replace("│", " ").split()) for line in capsys.readouterr().out.splitlines()]
    shown = {name for name in field_docs(cls) if any(line.startswith("--" + name.replace("_", "-")) for line in lines)}
    multi_line = {name: doc for name, doc in field_docs(cls).items() if "\n" in doc.strip() and name in shown}
    assert len(multi_line) >= 5
    for name, doc in multi_line.items():
        assert any(" ".join(doc.split()) in line for line in lines), name


@pytest.mark.parametrize(
    "command, rows, summary, dropped",
    [
        (
            "sft",
            [{"prompt": f"Q{i}:", "completion": " A."} for i in range(5)] + [{"prompt": "Q:", "completion": " "}],
            "6 rows, 5 kept, 1 dropped (empty_completion 1)",
            {"empty_completion": 1},
        ),
        (
            "reward",
            learnable_pairs(5) + [{"prompt": "Same:", "chosen": " x", "rejected": " x"}],
            "6 rows, 5 kept, 1 dropped (identical 1)",
            {"identical": 1},
        ),
    ],
)
def test_training_prints_the_drop_summary(tmp_path, tiny_model_dir, command, rows, summary, dropped):
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "run"
    r = run_cli(
        command,
        "--data",
        data,
        "--model",
        tiny_model_dir,
        "--output",
        out,
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--precision",
        "fp32",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{data}: {summary}" in r.stderr.splitlines(), r.stderr[-2000:]
    # saving final/ did not import DeepSpeed (make install installs it) in a run that never used it: its import
    # announces the accelerator it found, from deepspeed/accelerator/real_accelerator.py
    assert "real_accelerator" not in r.stderr, r.stderr[-2000:]
    info = json.loads((out / "run.json").read_text())["data"]
    assert (info["rows"], info["kept"], info["dropped"]) == (6, 5, dropped)
