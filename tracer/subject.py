"""Locating the subject's tokens in a prompt, by character offsets (any fast tokenizer).

    ids, (start, end) = tokenize_with_subject(lm, "The Eiffel Tower is in", "Eiffel Tower")

Works for byte-level BPE with or without a leading space and for SentencePiece-style
(Metaspace) tokenizers, because it maps the subject's character span through the tokenizer's
offset mapping instead of matching decoded strings.
"""
from __future__ import annotations

import re

from .errors import PromptError, SubjectNotFoundError
from .limits import check_prompt_length


def find_subject_span(tokenizer, prompt: str, subject: str, max_length: int | None = None) -> tuple[int, int]:
    """``[start, end)`` token positions of the first occurrence of ``subject`` in ``prompt``."""
    return tokenize_with_subject(tokenizer, prompt, subject, max_length)[1]


def tokenize_with_subject(tokenizer, prompt: str, subject: str, max_length: int | None = None) -> tuple[list[int], tuple[int, int]]:
    """Token ids of ``prompt`` (special tokens included as the model expects) and the subject span."""
    ids, offsets = tokenize_prompt(tokenizer, prompt, max_length)
    if not isinstance(subject, str) or not subject.strip():
        raise SubjectNotFoundError("the subject is empty; pass the words of the prompt that name the subject, e.g. 'The Eiffel Tower'")
    char_start = prompt.find(subject)
    if char_start < 0:
        near = prompt.lower().find(subject.lower())
        hint = f" (it occurs with different case: {prompt[near:near + len(subject)]!r})" if near >= 0 else ""
        raise SubjectNotFoundError(f"subject {subject!r} does not occur in prompt {prompt!r}{hint}; the subject must be a substring of the prompt")
    return ids, _span(offsets, char_start, subject, prompt)


def fill_subject(tokenizer, text: str, subject: str, max_length: int | None = None) -> tuple[list[int], int]:
    """Token ids of ``text`` with ``subject`` put at its ``{}`` (the exact place, whatever else the text
    holds), and the position of the last subject token: where ROME and MEMIT read keys and write."""
    at = text.index("{}")
    full = text[:at] + subject + text[at + 2:]
    ids, offsets = tokenize_prompt(tokenizer, full, max_length)
    return ids, _span(offsets, at, subject, full)[1] - 1


def _span(offsets: list[tuple[int, int]], char_start: int, subject: str, text: str) -> tuple[int, int]:
    """``[start, end)`` of the tokens overlapping ``subject`` at ``char_start`` (its surrounding white
    space excluded: a token of white space alone is not part of the subject)."""
    char_end = char_start + len(subject.rstrip())
    char_start += len(subject) - len(subject.lstrip())
    inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < char_end and b > char_start]
    if not inside:
        raise SubjectNotFoundError(f"subject {subject!r} maps to no token of {text!r}")
    return inside[0], inside[-1] + 1


def tokenize_prompt(tokenizer, prompt: str, max_length: int | None = None) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of a prompt; :class:`PromptError` for empty or too long."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError("the prompt is empty; pass a sentence that the model should complete, e.g. 'The Eiffel Tower is located in the city of'")
    if not getattr(tokenizer, "is_fast", False):
        raise PromptError(f"{type(tokenizer).__name__} is not a fast tokenizer; factscope needs character offsets (use a tokenizer with is_fast=True)")
    enc = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if max_length is not None:
        check_prompt_length(len(ids), max_length)
    return ids, offsets


def guess_subject(prompt: str) -> str:
    """A guess at the subject: the leading run of capitalised words (or the first word).

    Only a starting point for the panels' subject box; the user can always change it.
    """
    words = prompt.strip().split()
    run = []
    for w in words:
        if run and not (w[:1].isupper() or w[:1].isdigit() or w.lower() in {"of", "de", "the", "and", "von", "van"}):
            break
        run.append(w)
    while run and run[-1].lower() in {"of", "de", "the", "and", "von", "van"}:
        run.pop()
    guess = " ".join(run) if run else (words[0] if words else "")
    return re.sub(r"[,;:.!?]+$", "", guess)
