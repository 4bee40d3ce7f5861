"""Shared fixtures. Tests never touch a hub: HF_HUB_OFFLINE is forced on."""

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HH_RLHF = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
RT_POLARITY = SHARED_DATA / "rt-polarity"


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded default model's tokenizer (converted once per machine, then read from the cache)."""
    from prefalign.models import load_tokenizer

    return load_tokenizer()


@pytest.fixture()
def tiny_model(tokenizer):
    """A fresh 2-layer, hidden-32 random Llama with the default tokenizer."""
    from prefalign.models import tiny_causal_lm

    model, _ = tiny_causal_lm(tokenizer)
    return model
