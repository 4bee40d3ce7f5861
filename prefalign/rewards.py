"""Reward sources: what scores a (prompt, completion) pair for PPO, ``prefs`` and ``eval``.

Every source has a ``name`` and ``score(prompts, completions, columns=None) -> (B,)`` float32 CPU tensor.
Inputs are decoded text, the completion already cut at EOS / stop string; ``columns`` are the prompt rows'
other dataset columns (name -> B values aligned with the completions), which a callable and the ``arithmetic``
judge read. Three kinds, chosen by :func:`load_reward_source` from one string:

* a built-in judge from :data:`JUDGES` (`prefalign.judges`): ``vader``, the gold judge of controlled sentiment
  generation, or ``arithmetic``, exact match with the prompt row's ``answer`` column;
* a Python callable, ``module:function`` or ``path/to/file.py:function``, called as
  ``fn(prompts, completions, **columns)`` (TRL's reward-function convention) and returning one number per
  completion; it gets the columns its signature names (all of them with ``**kwargs``; none: ``fn(prompts,
  completions)``);
* a sequence-classification reward model with a scalar head (a directory or a hub id).

Reward models and pad == EOS: HF sequence-classification models pool at "the rightmost token that is
not ``pad_token_id``". When pad == EOS (SmolLM2, Llama, ...) and a completion ends with EOS, that rule
silently scores the token *before* the EOS. So for models built the usual way (a backbone at
``model.base_model`` and a linear ``model.score`` head: Llama, Mistral, Qwen, GPT-2, GPT-NeoX, ...) we
right-pad, run the backbone with the attention mask, take the hidden state at the last real token
(index from the attention mask, never from token ids) and apply the score head there. Other heads
(encoders such as DeBERTa/BERT pool the first token, which padding cannot move) go through the model's
own forward with the same right-padded batch. That pooling is `prefalign.models.value.last_token_rewards`;
the reward trainer uses the same function, so a trained model scores here exactly as it scored in training.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from prefalign.data.tokens import leading_bos
from prefalign.errors import UserError
from prefalign.judges import ArithmeticJudge, Columns, VaderJudge, check_pairs
from prefalign.models.frozen import frozen_autocast, hold_linear_weights_in, is_reduced
from prefalign.models.loading import EMBEDDED, is_hub_id
from prefalign.models.value import last_token_rewards, pools_last_token


@runtime_checkable
class RewardSource(Protocol):
    """Anything that scores decoded (prompt, completion) pairs."""

    name: str

    def score(self, prompts: list[str], completions: list[str], columns: Columns | None = None) -> torch.Tensor:
        """Return ``(B,)`` float32 scores on CPU, one per pair; ``columns``: the prompt rows' other columns, each B
        values aligned with the completions (a source may ignore them)."""
        ...


def _keyword_params(fn: Callable, skip: int) -> tuple[set[str], dict[str, bool], bool]:
    """What ``fn`` accepts after its first ``skip`` positional parameters: ``(skipped names, {keyword name:
    required}, takes **kwargs)``. A signature Python cannot read (some builtins) accepts nothing more."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return set(), {}, False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    skipped = {p.name for p in positional[:skip]}
    named = {
        p.name: p.default is p.empty
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in skipped
    }
    return skipped, named, any(p.kind == p.VAR_KEYWORD for p in params)


def score_with_columns(
    source: RewardSource, prompts: list[str], completions: list[str], columns: Columns | None
) -> torch.Tensor:
    """``source.score`` with ``columns`` when its ``score`` takes them (every source here does); a source of
    your own written as ``score(prompts, completions)`` is called as before."""
    _, named, var_kw = _keyword_params(source.score, 2)
    if columns is not None and ("columns" in named or var_kw):
        return source.score(prompts, completions, columns=columns)
    return source.score(prompts, completions)


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_scores(values, n: int, where: str) -> torch.Tensor:
    """Validate ``values`` as ``n`` finite numbers and return them as a ``(n,)`` float32 CPU tensor.

    ``where`` names the source in the one-line ``UserError`` (e.g. ``"reward function 'm:f'"``).
    Accepts a list/tuple of numbers or a 1-D tensor/array.
    """
    shape = getattr(values, "shape", None)
    if shape is not None and hasattr(values, "tolist"):  # torch / numpy: check the shape, then go to Python
        if len(shape) != 1:
            raise UserError(f"{where} returned an array of shape {tuple(shape)}; expected shape ({n},)")
        values = values.tolist()
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__") or not hasattr(values, "__getitem__"):
        raise UserError(f"{where} returned {type(values).__name__}; expected a list of {n} numbers")
    if len(values) != n:
        raise UserError(f"{where} returned {len(values)} scores for {n} completions; expected one per completion")
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, numbers.Real):
            raise UserError(f"{where} returned a non-number at index {i}: {_short(v)} ({type(v).__name__})")
        if not isinstance(v, numbers.Integral) and not math.isfinite(v):  # an int is finite (and may be huge)
            raise UserError(f"{where} returned a non-finite score at index {i}: {v}")
        # scores are float32: 1e39 would be stored as inf; 10**400 has no float at all
        if abs(v) > FLOAT32_MAX:  # type: ignore[operator]  # a numbers.Real compares with a float
            raise UserError(
                f"{where} returned a score at index {i} beyond float32's range (3.4e38): {_short(v)}; scale it down"
            )
        out.append(float(v))
    return torch.tensor(out, dtype=torch.float32)


FLOAT32_MAX = float(torch.finfo(torch.float32).max)
"""The largest score a reward may return: scores are held in float32."""


# ---------------------------------------------------------------------------------------------- judges

# The judges themselves are in prefalign.judges (imported from here as before).
JUDGES: dict[str, Callable[[], RewardSource]] = {"vader": VaderJudge, "arithmetic": ArithmeticJudge}
"""Built-in judges by name; each entry builds a source with no arguments."""


# ------------------------------------------------------------------------------------------- callables


def _import_target(spec: str):
    """Import ``module:attr`` or ``path/to/file.py:attr`` and return the attribute."""
    module_part, _, attr = spec.rpartition(":")
    if not module_part or not attr:
        raise UserError(f"reward function {spec!r}: expected module:function or path/to/file.py:function")
    is_file = module_part.endswith(".py") or "/" in module_part
    try:
        if is_file:
            path = Path(module_part).expanduser()
            if not path.is_file():
                raise UserError(f"reward function {spec!r}: file {module_part} not found")
            # A private module name, so a user file called e.g. json.py cannot shadow a real module.
            mod_name = f"_prefalign_reward_{path.stem}"
            mod_spec = importlib.util.spec_from_file_location(mod_name, path)
            if mod_spec is None or mod_spec.loader is None:  # no loader for its suffix
                raise UserError(f"reward function {spec!r}: {module_part} is not a Python file; name a .py file")
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_name] = module  # dataclasses / pickling inside the file look it up here
            try:
                mod_spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[mod_name]
                raise
        else:
            module = importlib.import_module(module_part)
    except UserError:
        raise
    except ModuleNotFoundError as e:
        if not is_file and e.name and (module_part == e.name or module_part.startswith(e.name + ".")):
            raise UserError(
                f"reward function {spec!r}: module {module_part!r} not found; make it importable "
                f"(PYTHONPATH) or give a file path, e.g. path/to/{module_part.split('.')[-1]}.py:{attr}"
            ) from None
        raise UserError(f"reward function {spec!r}: importing {module_part} failed: ModuleNotFoundError: {e}") from e
    except Exception as e:
        raise UserError(
            f"reward function {spec!r}: importing {module_part} failed: {type(e).__name__}: {_first_line(e)}"
        ) from e
    target = module
    for part in attr.split("."):  # allows module:Class.method
        if not hasattr(target, part):
            raise UserError(f"reward function {spec!r}: {module_part} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise UserError(f"reward function {spec!r}: {attr} is a {type(target).__name__}, not callable")
    return target


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


class CallableReward:
    """A user function ``fn(prompts, completions, **columns) -> sequence of numbers``, validated on every call.

    Of the prompt rows' other columns, ``fn`` gets as keyword arguments (each a list aligned with the
    completions, as TRL's GRPOTrainer passes dataset columns) those its signature names, or all with
    ``**kwargs``; a function with neither is called ``fn(prompts, completions)``."""

    def __init__(self, spec: str, fn: Callable | None = None):
        self.name = spec
        self._fn = fn if fn is not None else _import_target(spec)
        self._positional, self._named, self._all_columns = _keyword_params(self._fn, 2)

    def column_kwargs(self, columns: Columns | None) -> Columns:
        """The keyword arguments of the call: the columns ``fn`` names (or all, bar its two positional names, with
        ``**kwargs``), copied; a required parameter that is no column is a `UserError` naming it."""
        columns = columns or {}
        for param, required in self._named.items():
            if required and param not in columns:
                raise UserError(
                    f"reward function {self.name!r} needs {param!r}, which is not a column of the prompt "
                    f"rows (columns: {', '.join(columns) or 'none'}); add it to the prompt file or give "
                    f"{param} a default"
                )
        wanted = [c for c in columns if c not in self._positional] if self._all_columns else self._named
        return {c: list(columns[c]) for c in wanted if c in columns}

    def score(self, prompts: list[str], completions: list[str], columns: Columns | None = None) -> torch.Tensor:
        check_pairs(prompts, completions, columns)
        where = f"reward function {self.name!r}"
        kwargs = self.column_kwargs(columns)
        try:
            values = self._fn(list(prompts), list(completions), **kwargs)  # copies: the function may mutate them
        except Exception as e:
            raise UserError(f"{where} raised {type(e).__name__}: {_first_line(e)}") from e
        return check_scores(values, len(completions), where)


# ------------------------------------------------------------------------------------- reward models


def _parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise UserError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return value


def position_limits(config, tokenizer) -> list[int]:
    """The most tokens a model can take, as its config and tokenizer state it ([] when neither does): absolute
    position embeddings (BERT, RoBERTa: 512) fail past theirs. A tokenizer's ``model_max_length`` counts where it is
    a real limit (transformers sets ~1e30 when unknown); it is RoBERTa's 512 where the config's 514 counts an
    offset."""
    limits = [n for n in (getattr(config, "max_position_embeddings", None), getattr(config, "n_positions", None)) if n]
    if (n := getattr(tokenizer, "model_max_length", None)) and n < 10**7:
        limits.append(int(n))
    return limits


class RewardModel:
    """A sequence-classification model with a scalar head, scoring ``prompt + completion`` as given.

    The text is concatenated without re-templating (a chat-templated prompt stays as it was built);
    inputs longer than ``max_length`` tokens (capped at the model's position limit, `position_limits`) lose their
    *start* so the completion is always scored.
    ``autocast_dtype`` bf16 (PPO's --frozen-dtype): the linear weights held in bf16
    (`prefalign.models.frozen.hold_linear_weights_in`, embeddings and norms stay as loaded) and every batch scored
    under autocast to it, scores within bf16 rounding of float32's; None or float32: scored as loaded, no autocast.
    """

    def __init__(
        self,
        spec: str,
        *,
        batch_size: int = 16,
        device: str = "cpu",
        max_length: int = 1024,
        dtype=None,
        autocast_dtype: torch.dtype | None = None,
    ):
        from transformers import AutoConfig, AutoModelForSequenceClassification

        from prefalign.models.loading import _hub_error, disable_dropout, load_tokenizer, resolve_model

        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size}, {max_length}")
        self.name, self.batch_size, self.device, self.max_length = spec, batch_size, device, max_length
        path = resolve_model(spec)
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise _hub_error(spec, e) from None
        if config.num_labels != 1:
            raise UserError(
                f"{spec}: the model has num_labels={config.num_labels}; a reward model needs a "
                "scalar head (num_labels=1)"
            )
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=_parse_dtype(dtype) or torch.float32, output_loading_info=True
            )
        except (OSError, ValueError) as e:
            raise _hub_error(spec, e) from None
        if info["missing_keys"]:
            # A causal LM loads "fine" as seq-cls with a random head; scores would be noise.
            missing = sorted(info["missing_keys"])
            raise UserError(
                f"{spec}: not a trained reward model: weights {', '.join(missing[:3])} are missing "
                f"from the checkpoint (architecture {(config.architectures or ['?'])[0]})"
            )
        disable_dropout(model)
        model.eval().requires_grad_(False)
        self.autocast_dtype = autocast_dtype
        if is_reduced(autocast_dtype):
            hold_linear_weights_in(model, autocast_dtype)
        self.model = model.to(device)
        self.tokenizer = load_tokenizer(spec)  # its own tokenizer; EOS stands in for a missing pad
        self.tokenizer.padding_side = "right"  # last real token at mask.sum() - 1
        self.tokenizer.truncation_side = "left"  # keep the completion, drop the start of the prompt
        self.max_length = min(max_length, *position_limits(config, self.tokenizer))
        # a text that starts with the BOS its tokenizer puts in front anyway (a chat template writes it): scored as
        # prefalign's reward trainer tokenised it, with one BOS, not two
        self._bos_text = self.tokenizer.bos_token if leading_bos(self.tokenizer) is not None else None
        self._own_pooling = pools_last_token(model)

    @torch.no_grad()
    def _score_batch(self, texts: list[str]) -> torch.Tensor:
        if bos := self._bos_text:
            texts = [t[len(bos) :] if t.startswith(bos) else t for t in texts]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt").to(
            self.device
        )
        lengths = enc["attention_mask"].sum(-1)  # (b,)
        if (lengths == 0).any():
            raise ValueError(f"empty text at batch index {int((lengths == 0).nonzero()[0])}")
        # bf16-held linear weights need bf16 inputs: an autocast of this model's own (a float32 run has none)
        with frozen_autocast(self.device, self.autocast_dtype):
            if not self._own_pooling:
                return self.model(**enc).logits[:, 0]
            return last_token_rewards(self.model, enc["input_ids"], enc["attention_mask"])

    def score(self, prompts: list[str], completions: list[str], columns: Columns | None = None) -> torch.Tensor:
        check_pairs(prompts, completions, columns)
        texts = [p + c for p, c in zip(prompts, completions)]
        parts = [self._score_batch(texts[i : i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        if not parts:
            return torch.zeros(0, dtype=torch.float32)
        return torch.cat(parts).float().cpu()


# ------------------------------------------------------------------------------------------- dispatch


def is_reward_model(spec: str) -> bool:
    """Whether `load_reward_source` reads ``spec`` as a reward model (neither a judge name nor a callable)."""
    return spec not in JUDGES and not (":" in spec and not Path(spec).expanduser().exists())


def check_reward_model_name(spec: str) -> None:
    """Refuse, without loading anything, a spec read as a reward model that is neither an existing path, a hub id
    (``org/name``) nor an embedded model: most likely a misspelt judge or a missing directory."""
    if not (Path(spec).expanduser().exists() or is_hub_id(spec) or spec in EMBEDDED):
        raise UserError(
            f"unknown reward source {spec!r}: not a built-in judge ({', '.join(JUDGES)}), a module:function, a "
            "reward-model directory or a hub id (org/name)"
        )


def load_reward_source(
    spec: str,
    *,
    batch_size: int = 16,
    device: str = "cpu",
    max_length: int = 1024,
    dtype=None,
    autocast_dtype: torch.dtype | None = None,
) -> RewardSource:
    """Build a reward source from one string, tried in this order:

    1. a judge name from :data:`JUDGES` (``vader``);
    2. contains ``:`` and is not an existing path: a callable, ``module:function`` or ``file.py:function``;
    3. otherwise a reward-model directory or hub id (``batch_size``, ``device``, ``max_length``,
       ``dtype`` and ``autocast_dtype`` apply only here: `RewardModel`).
    """
    if spec in JUDGES:
        return JUDGES[spec]()
    if not is_reward_model(spec):
        return CallableReward(spec)
    check_reward_model_name(spec)
    return RewardModel(
        spec, batch_size=batch_size, device=device, max_length=max_length, dtype=dtype, autocast_dtype=autocast_dtype
    )
