"""``final/``: a trained model in Hugging Face format with its model card (`prefalign.trainers.card`), whole or
absent."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path
from unittest import mock

from prefalign.runio import as_created
from prefalign.trainers.backend import AccelerateBackend, Trained
from prefalign.trainers.card import CardFacts, write_model_card


def save_final_model(
    backend: AccelerateBackend,
    path: Path,
    trained: Trained,
    tokenizer,
    merged: bool = False,
    card: CardFacts | None = None,
) -> None:
    """Write ``trained``'s model to ``path`` from the main process; with ``merged``, also the LoRA adapter merged
    into its base as ``<path>-merged``; each with its model card when ``card`` is given. Every process calls it:
    when parameters are sharded the full weights are gathered collectively."""
    state = backend.full_state(trained)
    if backend.acc.is_main_process:
        save_pretrained_atomic(path, trained.model, tokenizer, state, card=card)
        if merged:
            save_pretrained_atomic(
                path.parent / f"{path.name}-merged",
                copy.deepcopy(trained.model).merge_and_unload(),
                tokenizer,
                card=card and dataclasses.replace(card, merged=True),
            )
    backend.acc.wait_for_everyone()


def save_pretrained_atomic(
    path: Path, model, tokenizer, state: dict | None = None, card: CardFacts | None = None
) -> None:
    """``model.save_pretrained`` (weights from ``state`` if given: a gathered full state dict) and, with ``card``,
    its model card (in place of the one peft writes for an adapter) into a temp directory renamed to ``path``."""
    for stale in path.parent.glob(f".tmp-{path.name}-*"):  # an earlier write killed before its rename
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        with _unwrap_without_importing_deepspeed():
            model.save_pretrained(tmp, **({} if state is None else {"state_dict": state}))
        tokenizer.save_pretrained(tmp)
        if card is not None:
            write_model_card(tmp, card)
        as_created(tmp, directory=True)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unwrap_without_importing_deepspeed():
    """transformers' ``save_pretrained`` unwraps the model with accelerate's ``extract_model_from_parallel``, which
    imports DeepSpeed whenever it is installed, only to test ``isinstance(model, DeepSpeedEngine)``: seconds of
    imports and a warning line in a run that never used DeepSpeed. A model cannot be an instance of a class whose
    module was never imported, so until something imported DeepSpeed (its backend does) the test is skipped."""
    if "deepspeed" in sys.modules:
        return contextlib.nullcontext()
    from accelerate.utils import other

    return mock.patch.object(other, "is_deepspeed_available", lambda: False)
