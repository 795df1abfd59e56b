"""Severed-path traces (the paper's Figure 7) against a direct computation written here.

The direct computation: for each (token t, layer l), one forward pass of the noised prompt with the
block output of layer l at token t set to its clean value and, for every later layer L > l, the MLP
(or attention) output at token t set to its value in the corrupted run. Hooks via tracer.hooks.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from float32 import prob_tol
from tracer.hooks import hooked, record_outputs
from tracer.subject import tokenize_with_subject
from tracer.trace import trace

PROMPT, SUBJECT, SCALE, SAMPLES, SEED = "in the river and then", "the river", 0.5, 3, 1


def _noised(span, noise):
    b, e = span

    def fn(h):
        h = h.clone()
        h[:, b:e] = (h[:, b:e].double() + noise).to(h.dtype)
        return h

    return fn


@torch.no_grad()
def direct_severed_scores(lm, severed: str | None) -> np.ndarray:
    ids, span = tokenize_with_subject(lm.tokenizer, PROMPT, SUBJECT)
    n_layers, names = lm.n_layers, lm.layers
    x = torch.tensor([ids] * SAMPLES)
    blocks = [names.block_name(layer) for layer in range(n_layers)]
    fns, clean = record_outputs(blocks)
    with hooked(lm.model, outputs=fns):
        answer = int(lm.model(torch.tensor([ids])).logits[0, -1].argmax())
    noise = torch.from_numpy(np.random.RandomState(SEED).randn(SAMPLES, span[1] - span[0], lm.hidden_size) * SCALE)
    paths = [names.name(severed, layer) for layer in range(n_layers)] if severed else []
    fns, corrupted = record_outputs(paths)
    with hooked(lm.model, outputs={**fns, names.embed: _noised(span, noise)}):
        lm.model(x)
    scores = np.zeros((len(ids), n_layers))
    for t in range(len(ids)):
        for layer in range(n_layers):
            def restore(h, _t=t, _clean=clean[blocks[layer]]):
                h = h.clone()
                h[:, _t] = _clean[0, _t]
                return h

            outputs = {names.embed: _noised(span, noise), blocks[layer]: restore}
            for later in range(layer + 1, n_layers):
                def freeze(h, _t=t, _frozen=corrupted[paths[later]] if severed else None):
                    h = h.clone()
                    h[:, _t] = _frozen[:, _t]
                    return h

                if severed:
                    outputs[paths[later]] = freeze
            with hooked(lm.model, outputs=outputs):
                logits = lm.model(x).logits[:, -1]
            scores[t, layer] = float(torch.softmax(logits.float(), -1)[:, answer].mean())
    return scores


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_severed_trace_matches_direct_computation(family):
    from conftest import make_tiny_model

    lm = make_tiny_model(family, n_layers=4)
    settings = dict(samples=SAMPLES, noise=SCALE, seed=SEED, progress=False)
    plain = trace(lm, PROMPT, SUBJECT, "hidden", **settings)
    # the engine's batches with a key/value cache against one full forward pass per cell: float32
    # sums in other orders along the whole path (tests/float32.py)
    tol = prob_tol(lm, len(plain.tokens))
    np.testing.assert_allclose(plain.scores, direct_severed_scores(lm, None), atol=tol, rtol=0)
    for path in ("mlp", "attn"):
        cut = trace(lm, PROMPT, SUBJECT, "hidden", severed=path, **settings)
        assert cut.severed == path and cut.low_score == plain.low_score and cut.high_score == plain.high_score
        np.testing.assert_allclose(cut.scores, direct_severed_scores(lm, path), atol=tol, rtol=0)
        # nothing above the last layer to sever: its row of restorations is unchanged, and exactly so.
        # The batches are planned without regard to severing, so each last-layer cell runs in the same
        # batch of the same shapes as in the plain trace; the severing hooks write only the rows of
        # cells restored below a layer, never this cell's rows: the same float32 operations on the
        # same inputs in the same process (tests/float32.py)
        np.testing.assert_array_equal(cut.scores[:, -1], plain.scores[:, -1])
        # below it, holding the later MLPs (attention) corrupted removes part of the restoration
        start = cut.subject_span[0]
        assert np.abs(cut.scores[start:, :-1] - plain.scores[start:, :-1]).max() > 1e-4
