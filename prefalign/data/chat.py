"""Chat messages: check them, render them with the tokenizer's chat template, split prompt from reply.

A conversational completion is the rendered text of (prompt + completion messages) minus the rendered
prompt (with the generation prompt, e.g. ``<|im_start|>assistant\\n``). That difference only makes
sense when the first rendering starts with the second; when a template renders them differently
(some strip earlier reasoning, or insert a date), the row is dropped with reason
``template_prefix_mismatch``.

A rendered completion's trailing whitespace is left off: what a template writes *after* the end-of-turn token
(ChatML's ``<|im_end|>\\n``, Gemma's ``<end_of_turn>\\n``, whether or not that token is the tokenizer's EOS),
and with a template that writes no end-of-turn token, the reply's own trailing whitespace. The model stops at the
end of its turn and never generates what follows it, so training on it would teach nothing and would put
whitespace between the end of turn and the EOS appended after it.
"""

from __future__ import annotations

from typing import Any

from prefalign.data.io import type_name
from prefalign.errors import UserError

ROLES = ("system", "user", "assistant", "tool")


def is_messages(value: Any) -> bool:
    """A list (possibly empty) whose items are all dicts: the shape of a conversation."""
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def check_messages(value: Any, field: str, where: str, source: str) -> list[dict]:
    """Return ``value`` if it is a list of ``{role, content}`` messages, else raise a one-line `UserError`."""
    at = f"{source}: {where}: {field!r}"
    if not isinstance(value, list):
        raise UserError(
            f"{at} must be a list of {{role, content}} messages, got {type_name(value)}; "
            "fix the row (or force the format that matches your columns)"
        )
    if not value:
        raise UserError(f"{at} is an empty message list; every conversation needs at least one message")
    for i, m in enumerate(value, start=1):
        if not isinstance(m, dict):
            raise UserError(f"{at} message {i} must be an object with role and content, got {type_name(m)}")
        if "role" not in m:
            raise UserError(f"{at} message {i} has no 'role'; give each message a role ({', '.join(ROLES)})")
        if m["role"] not in ROLES:
            raise UserError(f"{at} message {i} has unknown role {m['role']!r}; use one of {', '.join(ROLES)}")
        if "content" not in m:
            raise UserError(f"{at} message {i} has no 'content'; give each message a content string")
        if not isinstance(m["content"], str):
            raise UserError(f"{at} message {i} content must be a string, got {type_name(m['content'])}")
    return value


def require_template(tokenizer, source: str) -> None:
    if tokenizer is None:
        raise UserError(
            f"{source}: rows are chat messages; rendering them needs a tokenizer with a chat template "
            "(pass tokenizer=, or --model)"
        )
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{source}: rows are chat messages but the tokenizer has no chat template; "
            "use a chat model's tokenizer (--model)"
        )


def render(tokenizer, messages: list[dict], *, add_generation_prompt: bool, where: str, source: str) -> str:
    """The chat template's text for ``messages``; a template that refuses them is a `UserError` naming the row."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - jinja raises TemplateError, templates raise anything they like
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{source}: {where}: the tokenizer's chat template refused this conversation ({first}); "
            "fix the row or use a model whose template accepts it"
        ) from None
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def render_completion(
    tokenizer, prompt_text: str, prompt: list[dict], completion: list[dict], *, where: str, source: str
) -> str | None:
    """Text of ``completion`` after ``prompt_text`` (the rendered prompt), or None when the prefix differs."""
    full = render(tokenizer, prompt + completion, add_generation_prompt=False, where=where, source=source)
    if not full.startswith(prompt_text):
        return None
    # Whatever the end-of-turn token is (ChatML's <|im_end|> is SmolLM2's EOS; Gemma's <end_of_turn> is not
    # its <eos>), whitespace after it is never generated: the EOS the tokeniser appends must follow it directly.
    return full[len(prompt_text) :].rstrip()


def last_assistant(messages: list[dict]) -> int | None:
    """Index of the last assistant message, or None."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant":
            return i
    return None
