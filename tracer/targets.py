"""Answer text as a model sees it after a prompt: a word follows the prompt after a space.

    spaced("Rome")  == " Rome"       # a bare word gets the space it has after "... the city of"
    spaced(" Rome") == " Rome"       # a target that starts with whitespace is kept as it is
    target_ids(tokenizer, " Rome")   # its tokens on their own (no special tokens)

ROME's requests, CounterFact and zsRE targets, the lens's followed words and the panels' text
fields all mean the same thing by a target; this is the one rule for turning a bare word into it.
"""
from __future__ import annotations

from .errors import EditError, HyperParameterError


def spaced(target: str) -> str:
    """``target`` with a leading space unless it already starts with whitespace."""
    if not isinstance(target, str):
        raise HyperParameterError(f"a target must be a string, got {type(target).__name__}")
    return target if target[:1].isspace() else " " + target


def target_ids(tokenizer, target: str) -> list[int]:
    """The tokens of ``target`` on their own (no special tokens): what an editor makes likely."""
    ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])
    if not ids:
        raise EditError(f"target {target!r} encodes to no tokens")
    return ids
