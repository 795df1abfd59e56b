"""tracer/subject.py: subject spans by character offsets, for each tokenizer family."""
from __future__ import annotations

import pytest

from conftest import tiny_tokenizer
from tracer.errors import PromptError, SubjectNotFoundError
from tracer.subject import find_subject_span, guess_subject, tokenize_with_subject

CASES = [
    ("The Eiffel Tower is located in the city of", "The Eiffel Tower"),
    ("The Eiffel Tower is located in the city of", "Eiffel Tower"),
    ("Where is the Colosseum? The Colosseum is in", "Colosseum"),
    ("Danielle Darrieux's mother tongue is", "Danielle Darrieux"),
    ("Catalonia belongs to the continent of", "Catalonia"),
    ("In 1990, Toyota Corolla was made by", "Toyota Corolla"),
]


def _span_text(tok, prompt, subject):
    ids, (b, e) = tokenize_with_subject(tok, prompt, subject)
    return tok.decode(ids[b:e]), ids, (b, e)


@pytest.mark.parametrize("style", ["bytelevel", "bytelevel-prefix", "metaspace"])
@pytest.mark.parametrize("prompt,subject", CASES)
def test_span_decodes_to_subject(style, prompt, subject):
    tok = tiny_tokenizer(style)
    text, ids, (b, e) = _span_text(tok, prompt, subject)
    assert text.strip() == subject
    # the tokens just outside the span are not part of the subject
    assert tok.decode(ids[b:e + 1]).strip() != subject or e == len(ids)
    if b > 0:
        assert tok.decode(ids[b - 1:e]).strip() != subject


@pytest.mark.embedded
@pytest.mark.parametrize("prompt,subject", CASES)
def test_span_embedded_tokenizer(embedded, prompt, subject):
    text, _, _ = _span_text(embedded.tokenizer, prompt, subject)
    assert text.strip() == subject


def test_first_occurrence_and_known_positions():
    tok = tiny_tokenizer("bytelevel")
    ids, (b, e) = tokenize_with_subject(tok, "Where is the Colosseum? The Colosseum is in", "Colosseum")
    assert tok.decode(ids[:b]) == "Where is the"
    assert find_subject_span(tok, "The Eiffel Tower is", "The Eiffel Tower")[0] == 0


def test_errors():
    tok = tiny_tokenizer("bytelevel")
    with pytest.raises(SubjectNotFoundError, match="does not occur"):
        find_subject_span(tok, "The Eiffel Tower is", "Louvre")
    with pytest.raises(SubjectNotFoundError, match="empty"):
        find_subject_span(tok, "The Eiffel Tower is", "  ")
    with pytest.raises(PromptError, match="empty"):
        find_subject_span(tok, "", "x")
    with pytest.raises(PromptError, match="at most 3"):
        find_subject_span(tok, "The Eiffel Tower is located", "Eiffel", max_length=3)


def test_guess_subject():
    assert guess_subject("The Eiffel Tower is located in the city of") == "The Eiffel Tower"
    assert guess_subject("Danielle Darrieux's mother tongue is") == "Danielle Darrieux's"
    assert guess_subject("Bank of America is headquartered in") == "Bank of America"
    assert guess_subject("iPhone is made by") == "iPhone"
