"""Model cards: the ``README.md`` that every model a run saves (``final/``, ``final-merged/``, PPO's ``value/``)
carries, written with `huggingface_hub.ModelCard`, so a model pushed to the Hub or handed on says what it is and
how it was made.

The card is written last, when the run's files are complete: it reads ``config.yaml``, ``run.json`` and
``metrics.jsonl`` from the run directory, so it holds the final metrics of the run that saved it (a resumed run
included). What only the trainer knows comes in `CardFacts`: the command, the method (`prefalign.methods`) and the
model the saved one started from.

Hub metadata: ``library_name`` (``peft`` for a LoRA adapter, else ``transformers``), ``tags`` (``prefalign``, the
method's), ``pipeline_tag``, and ``base_model`` / ``datasets`` only where they are Hub ids, since the Hub refuses a
local path there (`hub_model_id`, `hub_dataset_id`); a local base model or data file is named in the text instead.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from prefalign.methods import Method
from prefalign.models.loading import ADAPTER_CONFIG, EMBEDDED
from prefalign.runio import CONFIG_FILE
from prefalign.trainers.metrics import METRICS_FILE

if TYPE_CHECKING:
    from huggingface_hub import ModelCard, ModelCardData

CARD_FILE = "README.md"
PACKAGES = ("prefalign", "torch", "transformers", "peft", "accelerate", "huggingface_hub")
"""The packages whose versions a card records."""
RUN_ONLY = ("output", "overwrite", "resume")
"""Config fields that say where and how a run wrote, not what it trained: left out of the card's config, so the
reproduce command writes a new directory and starts from step 0."""


@dataclass(frozen=True)
class CardFacts:
    """What the trainer knows about one saved model; the rest of its card comes from the run's files."""

    run_dir: Path
    """The run's --output: config.yaml, run.json, metrics.jsonl."""
    command: str
    """The CLI command that trained it (sft, dpo, reward, ppo, rl)."""
    method: Method
    """How it was trained."""
    base: str
    """The model it started from, as the user named it (hub id, directory or embedded name)."""
    merged: bool = False
    """A LoRA adapter merged into its base model (``final-merged/``)."""

    @property
    def run_name(self) -> str:
        """The run directory's name (of its absolute path: ``--output .`` has one too)."""
        return self.run_dir.resolve().name


def _is_repo_id(name: str) -> bool:
    """``org/name`` that the Hub accepts as a repository id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return name.count("/") == 1


def hub_model_id(name: str) -> str | None:
    """``base_model`` for a model that started from ``name``: the Hub id of an embedded model, a hub id itself,
    the ``base_model`` of a local directory's prefalign card (an earlier run's ``final/``: its nearest Hub
    ancestor), else None (a local directory the Hub cannot link to)."""
    from huggingface_hub import ModelCard

    if name in EMBEDDED:
        return EMBEDDED[name].hub_id
    path = Path(name).expanduser()
    if path.exists():
        card = path / CARD_FILE
        if not card.is_file():
            return None
        data = ModelCard.load(card).data
        base = data.base_model
        return base if "prefalign" in (data.tags or []) and isinstance(base, str) and _is_repo_id(base) else None
    return name if _is_repo_id(name) else None


def hub_dataset_id(source: str | None) -> str | None:
    """``source`` when the run read it from the Hub (read as `prefalign.data.io.read_table` reads it), else None."""
    from prefalign.data.io import looks_like_hub_id

    if not source or Path(source).expanduser().exists():
        return None
    return source if looks_like_hub_id(source) and _is_repo_id(source) else None


def final_metrics(path: Path) -> tuple[int | None, dict[str, Any]]:
    """``(step, metrics)``: the rows of ``metrics.jsonl`` at its last step merged in order (the training row and
    the final evaluation's), without ``step``; ``(None, {})`` when nothing was logged."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    rows = [json.loads(line) for line in lines if line.strip()]
    if not rows:
        return None, {}
    step = rows[-1]["step"]
    merged: dict[str, Any] = {}
    for row in rows:
        if row["step"] == step:
            merged.update({k: v for k, v in row.items() if k != "step"})
    return step, merged


def versions() -> dict[str, str]:
    """Python's and each of `PACKAGES`' version in this environment."""
    from prefalign import __version__

    found = {"python": platform.python_version(), "prefalign": __version__}
    for name in PACKAGES[1:]:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def card_metadata(facts: CardFacts, source: str | None, adapter: bool) -> ModelCardData:
    """The card's Hub metadata (`huggingface_hub.ModelCardData`); None fields are left out of the YAML."""
    from huggingface_hub import ModelCardData

    dataset = hub_dataset_id(source)
    lora = ["lora"] if adapter or facts.merged else []
    return ModelCardData(
        base_model=hub_model_id(facts.base),
        library_name="peft" if adapter else "transformers",
        tags=["prefalign", *facts.method.tags, *lora],
        datasets=[dataset] if dataset else None,
        pipeline_tag=facts.method.pipeline_tag,
    )


def _cell(value: Any) -> str:
    """A Markdown table cell that reads back as the value: JSON (a float's shortest exact repr), a string as it is
    (its ``|`` escaped)."""
    return value.replace("|", "\\|") if isinstance(value, str) else json.dumps(value)


def _table(header: tuple[str, str], rows: dict[str, Any]) -> list[str]:
    """A two-column Markdown table of ``rows``, one line each."""
    return [f"| {header[0]} | {header[1]} |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in rows.items())]


def _intro(facts: CardFacts, adapter: bool, base_id: str | list[str] | None) -> list[str]:
    """Title and what the model is; ``base_id``: the metadata's ``base_model`` (a Hub id or None here)."""
    if adapter and facts.method.pipeline_tag == "text-classification":
        # its base is often a causal LM, whose config builds a 2-label head: the saved 1-label score does not fit
        what = (
            "A LoRA adapter with a scalar head (load it with "
            "`peft.AutoPeftModelForSequenceClassification.from_pretrained(path, num_labels=1)`, or onto "
            "`AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)` with `peft.PeftModel`)"
        )
    elif adapter:
        what = "A LoRA adapter (load it onto its base model with `peft.PeftModel.from_pretrained`)"
    elif facts.merged:
        what = "A LoRA adapter merged into its base model (Hugging Face format)"
    else:
        what = "A model in Hugging Face format"
    hub = f" (on the Hub: `{base_id}`)" if base_id and base_id != facts.base else ""
    return [
        f"# {facts.run_name}: {facts.method.name}",
        "",
        f"{what}, trained with prefalign: `prefalign {facts.command}` from `{facts.base}`{hub}.",
        "",
    ]


def _method(facts: CardFacts, run: dict[str, Any]) -> list[str]:
    """The method, its loss and paper, and the run's derived facts (run.json less its data)."""
    m = facts.method
    return [
        "## Method",
        "",
        f"**{m.name}**",
        "",
        f"Loss: {m.formula}",
        "",
        f"References: {m.paper}.",
        "",
        *_table(("run.json", "value"), {k: v for k, v in run.items() if k != "data"}),
        "",
    ]


def _data(info: dict[str, Any] | None) -> list[str]:
    """Where the data came from and which rows were kept and dropped (run.json's ``data``)."""
    if not info:
        return []
    source = info.get("source", "")
    where = "a Hub dataset" if hub_dataset_id(source) else "a local file"
    dropped = info.get("dropped", {})
    reasons = ", ".join(f"{reason} {n}" for reason, n in dropped.items())
    split = ", ".join(f"{info[k]} {k}" for k in ("train", "eval") if k in info)
    return [
        "## Data",
        "",
        f"`{source}` ({where}): {info.get('rows')} rows read, {info.get('kept')} kept, "
        f"{sum(dropped.values())} dropped{f' ({reasons})' if reasons else ''}"
        f"{f'; {split}' if split else ''}.",
        "",
    ]


def _metrics(step: int | None, metrics: dict[str, Any]) -> list[str]:
    """The final metrics of `final_metrics`, exactly as logged."""
    if step is None:
        return ["## Final metrics", "", "None logged.", ""]
    return [
        f"## Final metrics (step {step})",
        "",
        "The last step's rows of `metrics.jsonl` (names in prefalign's docs/metrics.md):",
        "",
        *_table(("metric", "value"), metrics),
        "",
    ]


def _reproduce(facts: CardFacts, config: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """The command and the resolved config it reads."""
    processes = int(run.get("processes", 1))
    launcher = f"accelerate launch --num_processes {processes} -m prefalign" if processes > 1 else "prefalign"
    kept = {k: v for k, v in config.items() if k not in RUN_ONLY}
    return [
        "## Reproduce",
        "",
        "Save the config below as `config.yaml` and run (paths in it are as given to the "
        "run, relative to the directory it started in):",
        "",
        "```bash",
        f"{launcher} {facts.command} --config config.yaml --output runs/{facts.run_name}",
        "```",
        "",
        f"The run's resolved config (its `{CONFIG_FILE}` less {', '.join(RUN_ONLY)}):",
        "",
        "```yaml",
        yaml.safe_dump(kept, sort_keys=False).rstrip(),
        "```",
        "",
    ]


def write_model_card(model_dir: Path, facts: CardFacts) -> ModelCard:
    """Write ``model_dir/README.md`` (after the model's files: an adapter is told by its ``adapter_config.json``);
    returns the `huggingface_hub.ModelCard`."""
    from huggingface_hub import ModelCard

    run = json.loads((facts.run_dir / "run.json").read_text(encoding="utf-8"))
    config = yaml.safe_load((facts.run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    adapter = (model_dir / ADAPTER_CONFIG).is_file()
    data = card_metadata(facts, (run.get("data") or {}).get("source"), adapter)
    body = [
        *_intro(facts, adapter, data.base_model),
        *_method(facts, run),
        *_data(run.get("data")),
        *_metrics(*final_metrics(facts.run_dir / METRICS_FILE)),
        *_reproduce(facts, config, run),
        "## Versions",
        "",
        *_table(("package", "version"), versions()),
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")
    card.save(model_dir / CARD_FILE)
    return card
