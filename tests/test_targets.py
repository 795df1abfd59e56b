"""Engine helpers the panels call instead of holding the logic themselves (issue 16):
tracer.targets.spaced, tracer.trace_result.suggest_layer, and noise text parsed by tracer.noise alone."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import make_tiny_model
from test_figures import make_trace
from tracer.errors import HyperParameterError
from tracer.noise import resolve_noise, shipped_std, subject_embedding_std
from tracer.targets import spaced
from tracer.trace_result import suggest_layer


@pytest.mark.parametrize("text, expected", [("Rome", " Rome"), (" Rome", " Rome"), ("\nRome", "\nRome"),
                                            ("-based", " -based"), ("Rome ", " Rome ")])
def test_spaced_adds_the_space_a_word_has_after_a_prompt(text, expected):
    assert spaced(text) == expected


def test_spaced_refuses_what_is_not_text():
    with pytest.raises(HyperParameterError, match="must be a string"):
        spaced(3)


def test_suggest_layer_is_the_best_restoration_at_the_last_subject_token():
    trace = make_trace("mlp", span=(1, 4), n_layers=6)
    scores = np.array(trace.scores)
    scores[3] = [0.1, 0.2, 0.9, 0.3, 0.2, 0.1]   # last subject token: layer 2 recovers most
    scores[5] = [0.0, 0.0, 0.0, 0.0, 0.0, 0.99]  # the last token's best layer is not the suggestion
    trace = type(trace)(**{**trace.__dict__, "scores": scores})
    assert suggest_layer(trace) == 2
    with pytest.raises(HyperParameterError, match="TraceResult"):
        suggest_layer({"scores": scores})


def test_noise_text_is_parsed_by_resolve_noise_alone():
    """The panels and `factscope report` pass the user's noise text on as typed: tracer.noise reads
    numbers written as text, multiples of the embedding std, and refuses the rest."""
    lm = make_tiny_model("gpt2")
    spec = resolve_noise(lm, "0.25")
    assert spec.scale == 0.25 and spec.multiple is None
    spec = resolve_noise(lm, "3s")
    std = shipped_std(lm) or subject_embedding_std(lm)
    assert spec.multiple == 3.0 and spec.scale == pytest.approx(3 * std)
    with pytest.raises(HyperParameterError, match="not understood"):
        resolve_noise(lm, "loud")
