"""tracer/trace.py: the batched engine equals one-forward-per-restoration, and ROME's numbers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA, make_tiny_model
from float32 import prob_tol
from tracer.errors import HyperParameterError, PromptError, SubjectNotFoundError
from tracer.hooks import active_hook_count, hooked
from tracer.trace import _plan_batches, trace, trace_all
from tracer.trace_result import NoiseSpec, TraceResult

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"


@pytest.mark.parametrize("severed", [None, "mlp", "attn"])
def test_batched_equals_naive_all_kinds(tiny_lm, severed):
    kinds = ("hidden",) if severed else ("hidden", "mlp", "attn")
    common = dict(kinds=kinds, noise=0.5, samples=3, window=3, severed=severed, progress=False)
    batched = trace_all(tiny_lm, PROMPT, SUBJECT, **common)
    naive = trace_all(tiny_lm, PROMPT, SUBJECT, naive=True, **common)
    for kind in kinds:
        a, b = batched[kind], naive[kind]
        assert a.scores.shape == (len(a.tokens), tiny_lm.n_layers)
        # other batch shapes and a key/value cache: float32 sums in other orders (tests/float32.py, ~1e-3)
        np.testing.assert_allclose(a.scores, b.scores, atol=prob_tol(tiny_lm, len(a.tokens)), rtol=0)
        assert a.low_score == b.low_score  # both from the same corrupted run: the same bits
        assert a.n_forward < b.n_forward
    # the restorations actually move the answer: not all cells equal the corrupted score
    assert np.ptp(batched[kinds[0]].scores) > 1e-3


def test_small_batches_and_noise_options_match_naive():
    lm = make_tiny_model("llama", n_layers=6)
    prompt = "The Eiffel Tower is in"
    for kinds, options in ((("hidden", "mlp", "attn"), dict(noise_mode="torch")),
                           (("hidden",), dict(uniform_noise=True)), (("attn",), dict(replace=True, noise=0.3))):
        settings = dict(dict(noise=0.5, samples=2, window=4, kinds=kinds, progress=False), **options)
        many = trace_all(lm, prompt, SUBJECT, batch_tokens=24, **settings)  # many batches, from different layers
        naive = trace_all(lm, prompt, SUBJECT, naive=True, **settings)
        for kind in many:
            np.testing.assert_allclose(many[kind].scores, naive[kind].scores, atol=prob_tol(lm, len(many[kind].tokens)),
                                       rtol=0)  # see test_batched_equals_naive_all_kinds
            assert many[kind].n_forward > 8


def test_first_and_last_cells_have_exact_meaning():
    lm = make_tiny_model("gpt2")
    r = trace(lm, PROMPT, SUBJECT, "hidden", noise=0.5, samples=3, progress=False)
    b, e = r.subject_span
    # restoring a token before the subject changes nothing: the corrupted score
    assert np.all(r.scores[:b] == r.low_score)
    # restoring the last token's output at the last layer gives back the clean distribution
    # the restored state is the clean one, copied; only the final norm (two sums over hidden) and the
    # unembedding (hidden terms) run on another batch shape: 3 x hidden summands, not the whole path
    assert r.scores[-1, -1] == pytest.approx(r.high_score, abs=prob_tol(lm, len(r.tokens), length=3 * lm.hidden_size))
    assert r.answer == lm.decode(r.answer_id)


@pytest.mark.parametrize("severed", [None, "mlp"])
def test_selected_token_rows_equal_the_full_trace_bit_for_bit(severed):
    lm = make_tiny_model("llama")
    common = dict(noise=0.5, samples=3, severed=severed, progress=False)
    full = trace(lm, PROMPT, SUBJECT, "hidden", **common)
    last = trace(lm, PROMPT, SUBJECT, "hidden", tokens="last_subject", **common)
    b, e = full.subject_span
    assert last.traced_tokens == [e - 1]
    assert np.array_equal(last.scores[e - 1], full.scores[e - 1])  # same batches, same bits
    assert np.isnan(np.delete(last.scores, e - 1, axis=0)).all()
    assert (last.low_score, last.high_score) == (full.low_score, full.high_score)
    assert last.n_forward < full.n_forward
    # a before-subject row is the corrupted score without a forward pass; positions are de-duplicated
    some = trace(lm, PROMPT, SUBJECT, "hidden", tokens=[e, 0, e], **common)
    assert some.traced_tokens == [0, e] and np.all(some.scores[0] == full.low_score)
    assert np.array_equal(some.scores[e], full.scores[e])
    # NaN rows: JSON has null there and reads back; strongest() ignores them
    back = TraceResult.from_dict(json.loads(json.dumps(last.to_dict(), allow_nan=False)))
    assert np.array_equal(back.scores, last.scores, equal_nan=True)
    assert all(t == e - 1 for t, _, _ in last.strongest(50)) and len(last.strongest(50)) == lm.n_layers
    with pytest.raises(HyperParameterError, match="'all', 'last_subject' or a list"):
        trace(lm, PROMPT, SUBJECT, "hidden", tokens="first", **common)
    with pytest.raises(HyperParameterError, match=r"0\.\.\d+ for this prompt"):
        trace(lm, PROMPT, SUBJECT, "hidden", tokens=[99], **common)


def test_plan_batches_covers_units_once_and_respects_budget():
    units = [(3, layer, (layer,)) for layer in range(30)]
    batches = _plan_batches(units, tokens_per_unit=50, n_layers=30, budget=400, overhead=100)
    assert [u for b in batches for u in b] == units
    assert all(len(b) * 50 <= 400 for b in batches)
    assert len(_plan_batches(units, 50, 30, budget=10**9, overhead=10**9)) == 1


def test_hooks_removed_after_success_and_exception():
    lm = make_tiny_model("gptj")
    trace_all(lm, PROMPT, SUBJECT, noise=0.5, samples=2, window=2, progress=False)
    assert active_hook_count(lm.model) == 0

    def boom(h):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with hooked(lm.model, outputs={lm.layers.block_name(1): boom}, replace={lm.layers.block_name(0): lambda *a, **k: a[0]}):
            assert active_hook_count(lm.model) == 2
            lm.model(torch.tensor([lm.encode(PROMPT)]))
    assert active_hook_count(lm.model) == 0
    # an exception inside the engine (a broken answer hook) also leaves no hook behind
    with pytest.raises(RuntimeError, match="boom"):
        with hooked(lm.model, outputs={lm.layers.name("mlp", 2): boom}):
            trace(lm, PROMPT, SUBJECT, noise=0.5, samples=2, progress=False)
    assert active_hook_count(lm.model) == 0


def test_json_round_trip(tmp_path):
    lm = make_tiny_model("gpt_neox")
    r = trace(lm, PROMPT, SUBJECT, "mlp", noise="2s", samples=2, window=2, progress=False)
    d = r.to_dict()
    for key in ("tokens", "subject_span", "kind", "scores", "low_score", "high_score", "answer", "answer_id", "noise", "samples", "model"):
        assert key in d
    assert d["subject_span"] == [1, r.subject_span[1]] and d["noise"]["multiple"] == 2.0
    back = TraceResult.from_dict(json.loads(json.dumps(d)))
    np.testing.assert_array_equal(back.scores, r.scores)
    assert back.to_dict() == d
    r.save(tmp_path / "t.json")
    assert TraceResult.load(tmp_path / "t.json").to_dict() == d


def test_bad_inputs_have_specific_errors():
    lm = make_tiny_model("gpt2")
    with pytest.raises(SubjectNotFoundError, match="does not occur"):
        trace(lm, PROMPT, "Colosseum", progress=False)
    with pytest.raises(SubjectNotFoundError, match="different case"):
        trace(lm, PROMPT, "eiffel tower", progress=False)
    with pytest.raises(PromptError, match="empty"):
        trace(lm, "   ", "x", progress=False)
    with pytest.raises(PromptError, match="at most 128"):
        trace(lm, "word " * 200 + "Eiffel Tower", SUBJECT, progress=False)
    with pytest.raises(HyperParameterError, match="kind must be one of"):
        trace(lm, PROMPT, SUBJECT, "mlps", progress=False)
    with pytest.raises(HyperParameterError, match="samples"):
        trace(lm, PROMPT, SUBJECT, samples=0, progress=False)
    with pytest.raises(HyperParameterError, match="noise"):
        trace(lm, PROMPT, SUBJECT, noise="lots", progress=False)
    with pytest.raises(HyperParameterError, match="noise scale"):
        trace(lm, PROMPT, SUBJECT, noise=-1.0, progress=False)
    with pytest.raises(HyperParameterError, match="severed"):
        trace(lm, PROMPT, SUBJECT, "mlp", severed="mlp", progress=False)
    assert NoiseSpec(scale=0.1).mode == "rome"


@pytest.mark.embedded
def test_embedded_eiffel_tower_trace(embedded):
    r = trace(embedded, PROMPT, "The Eiffel Tower", "hidden", samples=5, progress=False)
    assert r.answer == " Paris" and r.high_score > 0.5
    assert r.low_score < r.high_score
    b, e = r.subject_span
    restored = (r.scores - r.low_score) / (r.high_score - r.low_score)
    # the early site: a subject token's state in an early-to-middle layer restores most of the gap.
    # For this prompt it sits at "iffel" (" Tower" follows from it), not at " Tower": measured
    # 0.57 at layer 6 for "iffel", below 0.02 at every layer for " Tower".
    assert r.tokens[2] == "iffel" and restored[2, :15].max() > 0.5
    assert restored[b:e, :15].max() == restored[2, :15].max()
    # the late site: the last token's state in the upper layers
    assert restored[-1, 20:].max() > 0.7 and restored[-1, :20].max() < 0.2


@pytest.mark.embedded
def test_golden_rome_reference(embedded):
    """The original ROME code's traces on the embedded model, reproduced number for number."""
    ref = json.loads((SHARED_DATA / "rome_reference_trace.json").read_text())
    results = trace_all(embedded, ref["prompt"], ref["subject"], noise=ref["noise"], noise_mode="rome",
                        samples=ref["samples"], window=ref["window"], progress=False)
    for kind in ("hidden", "mlp", "attn"):
        r = results[kind]
        assert r.tokens == ref["tokens"] and list(r.subject_span) == ref["subject_range"]
        assert r.answer == ref["answer"]
        # ROME's own code computed these: an independent implementation doing the same float32
        # operations in other orders through 30 layers. tests/float32.py's worst-case estimate is
        # vacuous at this depth (prob_tol ~ 4.9), so 1e-4 is an agreement threshold between two
        # implementations, not an arithmetic bound: largest difference measured 2.8e-6 (x86, 1 thread);
        # the batched == naive and restored == trace tests carry the arithmetic checks.
        assert r.high_score == pytest.approx(ref["high_score"], abs=1e-4)
        assert r.low_score == pytest.approx(ref[kind]["low_score"], abs=1e-4)
        np.testing.assert_allclose(r.scores, np.array(ref[kind]["scores"]), atol=1e-4, rtol=0)
    # ROME's early site: the last subject token ("onia") restores most of the gap in an early layer
    hidden = results["hidden"]
    gap = (hidden.scores[hidden.subject_span[1] - 1] - hidden.low_score) / (hidden.high_score - hidden.low_score)
    assert gap[:15].max() > 0.5 and int(gap.argmax()) < 15


@pytest.mark.embedded
def test_gemma_eiffel_tower_trace(gemma):
    """The second embedded family: Gemma 3 270M knows the fact, and its sites are where ROME's are."""
    r = trace(gemma, PROMPT, "The Eiffel Tower", "hidden", tokens=[2, 3, 9], samples=5, progress=False)
    assert r.tokens[1:4] == ["The", " Eiffel", " Tower"] and r.subject_span == (1, 4)  # after <bos>
    assert r.answer == " Paris"
    # the clean forward pass of the Q4_K_M weights dequantised to float32: 0.7594183683395386 here
    # (x86, 1 thread), equal to the GGUF loaded by transformers directly; 1e-4 is an agreement threshold
    # between machines through 18 layers (see test_golden_rome_reference), not an arithmetic bound
    assert r.high_score == pytest.approx(0.7594183683395386, abs=1e-4)
    assert r.noise.scale == 3 * 1.0311975479125977  # "3s" from the shipped std (tracer/data/noise_std.json)
    restored = (r.scores - r.low_score) / (r.high_score - r.low_score)
    # the early site sits at " Eiffel" (measured 0.61 at layer 3), not at " Tower" (at most 0.03);
    # the late site at the last token from layer 12 on (0.94 and more), nothing below layer 10 (0.001)
    assert restored[2, :12].max() > 0.5 and restored[3].max() < 0.1
    assert restored[9, 12:].min() > 0.9 and restored[9, :10].max() < 0.02


@pytest.mark.slow
@pytest.mark.embedded
def test_gemma_batched_equals_naive(gemma):
    """The batched engine (key/value cache over sliding-window layers, skipped blocks) against one
    forward pass per restoration on the real Gemma 3: largest difference measured 5.6e-8 (x86, 1
    thread); 1e-5 is an agreement threshold, as in test_golden_rome_reference."""
    common = dict(kinds=("hidden", "mlp"), tokens=[3], samples=4, progress=False)
    batched = trace_all(gemma, PROMPT, "The Eiffel Tower", **common)
    naive = trace_all(gemma, PROMPT, "The Eiffel Tower", naive=True, **common)
    for kind in common["kinds"]:
        np.testing.assert_allclose(batched[kind].scores[3], naive[kind].scores[3], atol=1e-5, rtol=0)
        assert np.ptp(batched[kind].scores[3]) > 1e-2
