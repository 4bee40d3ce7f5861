"""The model a race runs: the embedded default's weights, or a seeded random Llama of the default's shape
(``random-135m``) or of a ~1B shape (``random-1b``).

Random weights serve a machine without the default's weights (a GPU machine with no package index) and show how
the gap between the libraries moves with model size; a step costs the same FLOPs whatever the weights hold. Both
random shapes keep the default's vocabulary, special-token ids, RoPE and norm settings, so the same tokenizer,
pairs and prompts feed them. `bench.prepare` writes the chosen model once, seeded, and both sides load that one
directory.

A machine without the default's weights (or without ``../shared``) needs the two small inputs they provide: the
default tokenizer and the HH-RLHF test file. On a machine that has them,

    .venv/bin/python -m bench.models --save-inputs      # writes .bench/inputs/ (about 4 MB)

and bring ``.bench/inputs/`` along; `bench.prepare` reads it where the originals are missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from pathlib import Path

from bench.envs import BENCH_DIR, ROOT

MODELS = ("default", "random-135m", "random-1b")
RANDOM_SEED = 0
# the portable copies of the tokenizer and pairs file (module docstring)
INPUTS = BENCH_DIR / "inputs"
HH_RLHF_NAME = "harmless-base-test.jsonl.gz"
HH_RLHF = ROOT.parent / "shared" / "data" / "hh-rlhf" / HH_RLHF_NAME

# The default's config.json as prefalign converts it from the GGUF file (SmolLM2-135M-Instruct), field for field;
# tests/test_bench.py checks it against the converted copy where there is one. Written out here because a machine
# without the default's weights has no config.json to read.
SMOLLM2_135M = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "initializer_range": 0.02,
    "rms_norm_eps": 9.999999747378752e-06,
    "rope_theta": 100000.0,  # the keyword transformers 4.x and 5.x both read (5.x files it under rope_parameters)
    "tie_word_embeddings": True,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "pretraining_tp": 1,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "unk_token_id": 0,
    "use_cache": True,
}
# Llama 3.2 1B's body (width 2048, 16 layers, grouped-query attention 32/8 heads of 64, MLP 8192, tied embeddings)
# on the default's 49,152-token vocabulary: 1.07e9 parameters (Llama 3.2's own 128k vocabulary would make it 1.24e9
# and need another tokenizer)
LLAMA_1B = {
    **SMOLLM2_135M,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
}
SHAPES = {"random-135m": SMOLLM2_135M, "random-1b": LLAMA_1B}


def random_config(name: str):
    """The ``LlamaConfig`` of a random model name (a key of `SHAPES`)."""
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[name])


def build_random(name: str, seed: int = RANDOM_SEED):
    """A ``LlamaForCausalLM`` of shape ``name`` with transformers' own initialisation (normal(0, 0.02) weights),
    drawn on the CPU from ``seed``: the same weights on every machine with the same torch and transformers."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device("cpu"):  # CPU draws even under a CUDA default device, whose generator gives other numbers
        return LlamaForCausalLM(random_config(name)).eval()


def default_weights_present() -> bool:
    """Whether the embedded default's weights are here: converted in prefalign's cache, or the package that ships
    them installed (converted on first use)."""
    from prefalign.models.loading import DEFAULT_MODEL, EMBEDDED, cache_dir

    converted = (cache_dir() / DEFAULT_MODEL / "config.json").is_file()
    return converted or importlib.util.find_spec(EMBEDDED[DEFAULT_MODEL].package) is not None


def tokenizer_source() -> str | None:
    """Where a random model's tokenizer comes from: None (the default model's own) where the default is here, else
    the portable copy; a one-line error saying how to make that copy when neither is."""
    if default_weights_present():
        return None
    # config.json too: prefalign loads a tokenizer only from a model directory (`resolve_model`)
    if all((INPUTS / "tokenizer" / f).is_file() for f in ("tokenizer.json", "config.json")):
        return str(INPUTS / "tokenizer")
    raise SystemExit(
        f"bench: no default tokenizer here (neither the default model nor a complete {INPUTS / 'tokenizer'}: "
        "tokenizer.json and config.json); on a machine with "
        "the default model run `.venv/bin/python -m bench.models --save-inputs` and bring .bench/inputs/ along"
    )


def hh_rlhf_file() -> Path:
    """The shared HH-RLHF test file, or its portable copy (module docstring)."""
    for path in (HH_RLHF, INPUTS / HH_RLHF_NAME):
        if path.is_file():
            return path
    raise SystemExit(
        f"bench: {HH_RLHF} is missing and so is {INPUTS / HH_RLHF_NAME}; on a machine with both run "
        "`.venv/bin/python -m bench.models --save-inputs` and bring .bench/inputs/ along"
    )


def save_random(name: str, target: Path, seed: int = RANDOM_SEED) -> str:
    """Write the random model ``name`` and the default tokenizer to ``target`` (safetensors, fp32); return its path."""
    from prefalign.models import load_tokenizer

    tok = load_tokenizer(tokenizer_source())
    if len(tok) != SHAPES[name]["vocab_size"]:
        raise SystemExit(
            f"bench: the tokenizer has {len(tok)} tokens; {name} is built for {SHAPES[name]['vocab_size']}"
        )
    build_random(name, seed).save_pretrained(target)
    tok.save_pretrained(target)
    return str(target)


def save_inputs(out: Path = INPUTS) -> None:
    """Copy the default tokenizer (with the default's config.json, which makes its folder a model directory that
    prefalign's `load_tokenizer` takes) and the HH-RLHF test file to ``out``: what a machine without them needs."""
    from prefalign.models import load_tokenizer
    from prefalign.models.loading import resolve_model

    out.mkdir(parents=True, exist_ok=True)
    load_tokenizer(None).save_pretrained(out / "tokenizer")
    shutil.copyfile(Path(resolve_model(None)) / "config.json", out / "tokenizer" / "config.json")
    shutil.copyfile(HH_RLHF, out / HH_RLHF_NAME)
    print(f"wrote {out}: the default tokenizer and {HH_RLHF_NAME}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__.split("\n\n")[0])
    ap.add_argument("--save-inputs", action="store_true", help=f"write the portable inputs to {INPUTS}")
    args = ap.parse_args(argv)
    if not args.save_inputs:
        ap.error("nothing to do: give --save-inputs")
    save_inputs()


if __name__ == "__main__":
    sys.exit(main())
