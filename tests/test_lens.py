"""tracer/lens.py: the last layer's lens is the model's own prediction; restored runs replay traces."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_tiny_model
from float32 import prob_tol, softmax64_rtol
from tracer.errors import HyperParameterError, PromptError
from tracer.hooks import active_hook_count
from tracer.lens import LensResult, logit_lens, restored_lens
from tracer.errors import JobTooLargeError

PROMPT = "The Eiffel Tower is located in the city of"


def _model_probs(lm, prompt: str) -> torch.Tensor:
    ids = torch.tensor([lm.encode(prompt)])
    with torch.no_grad():
        return torch.softmax(lm.model(input_ids=ids).logits[0].double(), -1)


def test_last_layer_equals_model_logits(tiny_lm):
    """Tiny GPT-2 (LayerNorm, tied), GPT-J (untied, biased head), NeoX, Llama (RMSNorm, untied)."""
    lens = logit_lens(tiny_lm, PROMPT, targets=[" the", "a"])
    probs = _model_probs(tiny_lm, PROMPT)
    top_p, top_i = probs.max(-1)
    assert lens.top_probs.shape == (len(tiny_lm.encode(PROMPT)), tiny_lm.n_layers)
    # the same float32 logits (the same forward pass, shapes and process), then a float64 softmax on
    # both sides: only float64 rounding separates them (tests/float32.py)
    rtol = softmax64_rtol(probs.shape[-1], float(-probs.log().min()))
    np.testing.assert_allclose(lens.top_probs[:, -1], top_p.numpy(), rtol=rtol, atol=0)
    np.testing.assert_array_equal(lens.top_ids[:, -1], top_i.numpy())
    for k, tid in enumerate(lens.target_ids):
        np.testing.assert_allclose(lens.probs[k, :, -1], probs[:, tid].numpy(), rtol=rtol, atol=0)
        expected_rank = (probs > probs[:, tid : tid + 1]).sum(-1).numpy()
        np.testing.assert_array_equal(lens.ranks[k, :, -1], expected_rank)
    assert lens.target_ids[0] == int(top_i[-1])  # the answer comes first
    assert lens.ranks[0, -1, -1] == 0
    assert active_hook_count(tiny_lm.model) == 0


def test_earlier_layers_are_not_the_output(tiny_lm):
    """The lens decodes each layer's own state: an earlier layer differs from the output."""
    lens = logit_lens(tiny_lm, PROMPT)
    assert not np.allclose(lens.top_probs[:, 0], lens.top_probs[:, -1])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_final_norm_is_applied(family):
    """Dropping the final norm's gain changes the lens: the norm is really in the path."""
    lm = make_tiny_model(family)
    before = logit_lens(lm, PROMPT)
    norm = lm.model.get_submodule(lm.layers.final_norm)
    with torch.no_grad():
        norm.weight.mul_(3.0)
    after = logit_lens(lm, PROMPT)
    assert not np.allclose(before.top_probs, after.top_probs)


def test_round_trip(tiny_lm, tmp_path):
    lens = logit_lens(tiny_lm, PROMPT, targets=[" the"])
    lens.save(tmp_path / "lens.json")
    back = LensResult.load(tmp_path / "lens.json")
    assert back.tokens == lens.tokens and back.top_tokens == lens.top_tokens
    np.testing.assert_array_equal(back.probs, lens.probs)
    np.testing.assert_array_equal(back.ranks, lens.ranks)
    assert json.loads(json.dumps(back.to_dict())) == lens.to_dict()
    assert back.target_index(lens.targets[1]) == 1 and back.target_index(lens.target_ids[0]) == 0
    with pytest.raises(HyperParameterError, match="not in this lens"):
        back.target_index(" nowhere-to-be-found")


def test_round_trip_without_targets(tiny_lm):
    lens = logit_lens(tiny_lm, PROMPT, answer=False)
    back = LensResult.from_dict(json.loads(json.dumps(lens.to_dict())))
    assert back.probs.shape == (0, len(lens.tokens), tiny_lm.n_layers)
    np.testing.assert_array_equal(back.top_ids, lens.top_ids)


def test_bad_input(tiny_lm):
    with pytest.raises(PromptError):
        logit_lens(tiny_lm, "  ")
    with pytest.raises(HyperParameterError):
        logit_lens(tiny_lm, PROMPT, targets=[""])
    with pytest.raises(HyperParameterError):
        logit_lens(tiny_lm, PROMPT, runs=0)
    long = "word " * 200
    with pytest.raises(PromptError, match=rf"the prompt 'word word .* has {len(tiny_lm.encode(long))} tokens but the model "
                                          r"reads at most 128"):
        logit_lens(tiny_lm, long)
    with pytest.raises(JobTooLargeError, match="runs=10000000 is more than"):
        logit_lens(tiny_lm, PROMPT, runs=10_000_000)


@pytest.mark.parametrize("kind", ["hidden", "mlp", "attn"])
def test_restored_lens_replays_trace_cell(kind):
    """The restored run's final-layer answer probability equals the trace's score at that cell."""
    from tracer.trace import trace

    lm = make_tiny_model("llama")
    result = trace(lm, "The Eiffel Tower is in Paris", "Eiffel Tower", kind=kind, samples=3, noise=0.5,
                   window=2, progress=False)
    start, end = result.subject_span
    for token, layer in [(end - 1, 0), (end - 1, lm.n_layers - 1), (len(result.tokens) - 1, 1)]:
        lens = restored_lens(lm, result, token, layer)
        assert lens.samples == 3
        assert lens.target_ids[0] == result.answer_id
        # a full forward pass with hooks against the batched engine's cached one: float32 sums in
        # other orders along the whole path (tests/float32.py)
        assert lens.probs[0, -1, -1] == pytest.approx(result.scores[token, layer], abs=prob_tol(lm, len(result.tokens)))
    with pytest.raises(HyperParameterError, match="outside"):
        restored_lens(lm, result, 99, 0)
    assert active_hook_count(lm.model) == 0


@pytest.mark.embedded
def test_embedded_lens(embedded):
    lens = logit_lens(embedded, PROMPT, targets=[" Paris", " Rome"])
    probs = _model_probs(embedded, PROMPT)
    paris = lens.target_index(" Paris")
    assert lens.targets[0] == " Paris" and paris == 0
    # as in test_last_layer_equals_model_logits: the same float32 logits, float64 softmaxes. (The lens
    # used a float32 log-softmax: its 49,152-term sum differs between machines by up to
    # gamma(49152) ~ 3e-3 relative, which is how 0.7015511 vs 0.7015399 happened.)
    rtol = softmax64_rtol(probs.shape[-1], float(-probs.log().min()))
    np.testing.assert_allclose(lens.probs[:, -1, -1], probs[-1, lens.target_ids].numpy(), rtol=rtol, atol=0)
    np.testing.assert_allclose(lens.top_probs[:, -1], probs.max(-1).values.numpy(), rtol=rtol, atol=0)
    assert lens.probs[0, -1, -1] > 0.5
    # the answer emerges late: not in the top 100 at layer 5, top-1 by the last layer
    assert lens.ranks[0, -1, 5] > 100 and lens.ranks[0, -1, -1] == 0
