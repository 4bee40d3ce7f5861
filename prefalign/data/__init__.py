"""Load, validate and tokenise preference and prompt data; collate batches.

Typical use::

    examples, report = load_preferences("pairs.jsonl.gz", tokenizer)     # text pairs + drops by reason
    pairs, _ = tokenize_preferences(examples, tokenizer, max_length=1024)  # ids, fitted once
    batch = PreferenceCollator(tokenizer.pad_token_id)(pairs[:8])          # input_ids (16, T), masks
"""

from prefalign.data.collate import PreferenceCollator, PromptCollator, SFTCollator
from prefalign.data.io import Table, read_table
from prefalign.data.preferences import FORMATS, PreferenceExample, detect_format, load_preferences, parse_preferences
from prefalign.data.prompts import (
    load_prompt_rows,
    load_prompt_rows_reported,
    load_prompts,
    parse_prompts,
    read_prompts,
    take_rows,
)
from prefalign.data.report import DropReport
from prefalign.data.tokens import (
    MIN_PROMPT_TOKENS,
    TokenizedPair,
    TokenizedSFT,
    left_truncate,
    tokenize_preferences,
    tokenize_prompts,
    tokenize_sft,
    truncate_pairs,
)

__all__ = [
    "FORMATS",
    "MIN_PROMPT_TOKENS",
    "DropReport",
    "PreferenceCollator",
    "PreferenceExample",
    "PromptCollator",
    "SFTCollator",
    "Table",
    "TokenizedPair",
    "TokenizedSFT",
    "detect_format",
    "left_truncate",
    "load_preferences",
    "load_prompt_rows",
    "load_prompt_rows_reported",
    "load_prompts",
    "parse_preferences",
    "parse_prompts",
    "read_prompts",
    "read_table",
    "take_rows",
    "tokenize_preferences",
    "tokenize_prompts",
    "tokenize_sft",
    "truncate_pairs",
]
