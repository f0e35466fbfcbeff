"""The three row formats, each normalized to (prompt, chosen, rejected) text by one function.

- ``explicit``: prompt, chosen and rejected columns of text (the seed's row).
- ``implicit``: only chosen and rejected full texts that share a prefix (Anthropic HH): the
  prompt is their common prefix, cut back to a whole word (``implicit_prompt``).
- ``conversational``: lists of ``{role, content}`` messages, rendered with the tokenizer's chat
  template; the prompt with the generation prompt.

Each returns an ``Example`` or raises ``BadRow`` (the row is unusable: an error naming the file
and row, or skipped and counted with ``on_bad_row="skip"``) or ``Dropped`` (a usable row that
makes no pair, counted by reason). ``normalize`` checks the columns and picks the format.
"""

from __future__ import annotations

import dataclasses


class BadRow(ValueError):
    """A row that cannot be read as a preference pair; the message is the reason. ``fatal``:
    no row of this data can be read this way (a setting to change, not a row to skip)."""

    def __init__(self, reason: str, fatal: bool = False):
        super().__init__(reason)
        self.fatal = fatal


class Dropped(Exception):
    """A well-formed row that makes no training pair; ``reason`` is counted in the stats."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Example:
    """A normalized row. Conversational rows keep their messages too (``messages``: prompt,
    chosen, rejected lists), for tokenizers that render them with the chat template directly;
    ``prompt``/``chosen``/``rejected`` are then the rendered text, split where the reply starts."""

    prompt: str
    chosen: str
    rejected: str
    messages: tuple | None = None  # (prompt, chosen, rejected) message lists of a chat row

    @property
    def conversational(self) -> bool:
        return self.messages is not None


def is_conversation(v) -> bool:
    return (isinstance(v, list) and len(v) > 0
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in v))


def check_text(name: str, v):
    """Raises BadRow unless ``v`` is non-empty text or a conversation."""
    if v is None:
        raise BadRow(f"column {name!r} is null")
    if isinstance(v, str):
        if v == "":
            raise BadRow(f"column {name!r} is an empty string")
        return
    if isinstance(v, list):
        if not is_conversation(v):
            raise BadRow(f"column {name!r} is a list but not a conversation of "
                         "{role, content} messages")
        return
    raise BadRow(f"column {name!r} holds a {type(v).__name__} ({v!r:.40}) where text is expected")


def implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two full texts that share a prefix (Anthropic HH style) into prompt + completions.

    The prompt is their longest common prefix, cut back to the end of the last whole word, and the
    whitespace before the first differing word goes to the completions: GPT-2's BPE attaches the
    leading space to a word (" Sure"), so this tokenizes as the full text would.
    """
    k = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        k += 1
    mid_word = k > 0 and not chosen[k - 1].isspace() and any(
        k < len(s) and not s[k].isspace() for s in (chosen, rejected))
    if mid_word:
        while k > 0 and not chosen[k - 1].isspace():
            k -= 1
    while k > 0 and chosen[k - 1].isspace():
        k -= 1
    return chosen[:k], chosen[k:], rejected[k:]


def explicit(prompt: str, chosen: str, rejected: str) -> Example:
    return Example(prompt, chosen, rejected)


def implicit(chosen: str, rejected: str) -> Example:
    p, c, r = implicit_prompt(chosen, rejected)
    if not p:
        raise Dropped("no_common_prompt")
    return Example(p, c, r)


def conversational(prompt, chosen: list, rejected: list, tokenizer) -> Example:
    """Messages rendered with the chat template. ``prompt`` is a list of messages, a plain string
    (one user turn), or None: then the leading messages the two conversations share."""
    if not getattr(tokenizer, "chat_template", None):
        raise BadRow("conversational rows need a tokenizer with a chat template, and this "
                     "tokenizer has none (set tokenizer.chat_template, or give plain text columns)",
                     fatal=True)
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not prompt:  # implicit: the shared leading messages are the prompt
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    out = []
    for msgs in (chosen, rejected):
        full = tokenizer.apply_chat_template(prompt + msgs, tokenize=False)
        if not full.startswith(text):
            raise BadRow("the chat template does not render the conversation as the prompt "
                         "followed by the reply; cannot split it")
        out.append(full[len(text):])
    return Example(text, *out, messages=(prompt, chosen, rejected))


def normalize(prompt, chosen, rejected, *, names: tuple[str, str, str], has_prompt: bool,
              tokenizer) -> Example:
    """The row's Example: columns checked, format picked, drop rules applied."""
    for name, v in zip(names, (prompt, chosen, rejected)):
        if name != names[0] or has_prompt:
            check_text(name, v)
    if is_conversation(chosen) or is_conversation(rejected):
        if not (is_conversation(chosen) and is_conversation(rejected)):
            raise BadRow("chosen and rejected must both be conversations or both be text")
        ex = conversational(prompt if has_prompt else None, chosen, rejected, tokenizer)
    elif has_prompt:
        if not isinstance(prompt, str):
            raise BadRow("a conversation prompt needs conversation completions")
        ex = explicit(prompt, chosen, rejected)
    else:
        ex = implicit(chosen, rejected)
    if not ex.chosen.strip() or not ex.rejected.strip():
        raise Dropped("empty_completion")  # nothing, or whitespace only
    if ex.chosen == ex.rejected:
        raise Dropped("identical_completions")
    return ex
