"""tracer.aggregate: bucket assignment by hand, numba == NumPy bit for bit, seeded bootstrap."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracer.aggregate import (BUCKETS, EffectAverages, RaggedTraces, aggregate, bucket_effects, bucket_masks,
                              layer_table, trace_label)
from tracer.errors import DatasetError, HyperParameterError
from tracer.trace_result import NoiseSpec, TraceResult


def ragged_from(facts, n_layers=1, scores=None, low=None, high=None):
    """facts: list of (n_tokens, start, end)."""
    lengths = [n for n, _, _ in facts]
    total = sum(lengths)
    if scores is None:
        scores = np.arange(total * n_layers, dtype=np.float64).reshape(total, n_layers)
    return RaggedTraces.build(scores, np.concatenate([[0], np.cumsum(lengths)]), [s for _, s, _ in facts],
                              [e for _, _, e in facts], np.zeros(len(facts)) if low is None else low,
                              np.ones(len(facts)) if high is None else high)


def members(n, s, e):
    """{bucket: [token positions]} of one fact, from bucket_masks."""
    _, masks = bucket_masks(ragged_from([(n, s, e)]))
    return {b: np.flatnonzero(masks[i]).tolist() for i, b in enumerate(BUCKETS)}


@pytest.mark.parametrize("n, s, e, expected", [
    # "The Eiffel Tower is located in" style: token 0 before the subject belongs to no bucket
    (6, 1, 4, dict(first_subject=[1], middle_subject=[2], last_subject=[3], first_after=[4], further=[], last=[5])),
    # long subject at the start, several further tokens
    (8, 0, 4, dict(first_subject=[0], middle_subject=[1, 2], last_subject=[3], first_after=[4], further=[5, 6], last=[7])),
    # one-token subject at the start: first and last subject token are the same cell
    (4, 0, 1, dict(first_subject=[0], middle_subject=[], last_subject=[0], first_after=[1], further=[2], last=[3])),
    # subject followed by a single token: that token is first subsequent AND last
    (3, 0, 2, dict(first_subject=[0], middle_subject=[], last_subject=[1], first_after=[2], further=[], last=[2])),
    # one-token subject ending the prompt: no subsequent token; last subject token is the last token
    (3, 2, 3, dict(first_subject=[2], middle_subject=[], last_subject=[2], first_after=[], further=[], last=[2])),
    # a one-token prompt that is all subject
    (1, 0, 1, dict(first_subject=[0], middle_subject=[], last_subject=[0], first_after=[], further=[], last=[0])),
])
def test_buckets_by_hand(n, s, e, expected):
    assert members(n, s, e) == expected
    # the numba kernel puts the same cells in the same buckets: score of token t is 2**t
    r = ragged_from([(n, s, e)], scores=(2.0 ** np.arange(n))[:, None])
    nums = bucket_effects(r, n_boot=0)
    for i, b in enumerate(BUCKETS):
        assert nums["cells"][i] == len(expected[b])
        if expected[b]:
            assert nums["means"][i, 0] == sum(2.0 ** t for t in expected[b]) / len(expected[b])
        else:
            assert np.isnan(nums["means"][i, 0])


def test_averages_by_hand():
    # fact A: 5 tokens, subject [0, 3); fact B: 4 tokens, subject [1, 2)
    scores = np.array([[.1, .2], [.3, .4], [.5, .6], [.7, .8], [.9, 1.0],       # A
                       [.0, .0], [.2, .1], [.4, .3], [.6, .5]])                  # B
    r = ragged_from([(5, 0, 3), (4, 1, 2)], n_layers=2, scores=scores, low=np.array([.1, .2]),
                    high=np.array([.9, .5]))
    nums = bucket_effects(r, n_boot=0)
    means, cells = nums["means"], nums["cells"]
    # first subject: A token 0 (.1,.2)-.1 ; B token 1 (.2,.1)-.2
    np.testing.assert_allclose(means[0, :2], [((.1 - .1) + (.2 - .2)) / 2, ((.2 - .1) + (.1 - .2)) / 2])
    # middle subject: only A token 1
    np.testing.assert_allclose(means[1, :2], [.3 - .1, .4 - .1])
    # last subject: A token 2, B token 1 (one-token subject)
    np.testing.assert_allclose(means[2, :2], [((.5 - .1) + (.2 - .2)) / 2, ((.6 - .1) + (.1 - .2)) / 2])
    # first subsequent: A token 3, B token 2
    np.testing.assert_allclose(means[3, :2], [((.7 - .1) + (.4 - .2)) / 2, ((.8 - .1) + (.3 - .2)) / 2])
    # further: none (A: token 4 is last; B: token 3 is last)
    assert cells[4] == 0 and np.isnan(means[4]).all()
    # last token: A token 4, B token 3; total effect = mean(high - low) = (.8 + .3) / 2
    np.testing.assert_allclose(means[5, :2], [((.9 - .1) + (.6 - .2)) / 2, ((1.0 - .1) + (.5 - .2)) / 2])
    np.testing.assert_allclose(means[5, 2], (.8 + .3) / 2)
    assert cells.tolist() == [2, 1, 2, 2, 0, 2]
    assert nums["facts"].tolist() == [2, 1, 2, 2, 0, 2]


@st.composite
def ragged_inputs(draw):
    n_facts = draw(st.integers(1, 9))
    n_layers = draw(st.integers(1, 6))
    facts = []
    for _ in range(n_facts):
        n = draw(st.integers(1, 14))
        length = draw(st.sampled_from([1, 1, 2, 3, n]) if n > 3 else st.integers(1, n))
        length = min(length, n)
        where = draw(st.sampled_from(["start", "middle", "end", "anywhere"]))
        s = {"start": 0, "end": n - length, "middle": (n - length) // 2}.get(where)
        if s is None:
            s = draw(st.integers(0, n - length))
        facts.append((n, s, s + length))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    total = sum(n for n, _, _ in facts)
    # magnitudes over six decades, so that a different summation order would change the bits
    scores = rng.standard_normal((total, n_layers)) * 10.0 ** rng.uniform(-3, 3, (total, n_layers))
    low, high = rng.random(n_facts) * 0.1, rng.random(n_facts)
    if draw(st.booleans()):  # some rows not traced (NaN), as with tokens="last_subject"
        scores[rng.random(total) < 0.4] = np.nan
    return ragged_from(facts, n_layers, scores, low, high), seed


@settings(max_examples=60, deadline=None)
@given(ragged_inputs(), st.integers(0, 70))
def test_numba_equals_numpy_exactly(inputs, n_boot):
    r, seed = inputs
    a = bucket_effects(r, n_boot=n_boot, seed=seed, backend="numba")
    b = bucket_effects(r, n_boot=n_boot, seed=seed, backend="numpy")
    for key in ("means", "cells", "facts", "boot"):
        assert a[key].shape == b[key].shape
        assert np.array_equal(a[key], b[key], equal_nan=True), key


def make_trace(scores, span, low, high, kind="hidden", severed=None, model="m"):
    n = len(scores)
    return TraceResult(prompt="p", subject="s", tokens=[f"t{i}" for i in range(n)], subject_span=span, kind=kind,
                       window=1 if kind == "hidden" else 10, scores=np.asarray(scores, dtype=np.float64),
                       low_score=low, high_score=high, answer=" a", answer_id=1, noise=NoiseSpec(scale=0.1),
                       samples=10, seed=1, model=model, severed=severed)


def random_traces(n, seed=0, n_layers=5, kind="hidden"):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(2, 12))
        s = int(rng.integers(0, length - 1))
        e = int(rng.integers(s + 1, length))
        out.append(make_trace(rng.random((length, n_layers)), (s, e), float(rng.random() * .1), float(rng.random()),
                              kind=kind))
    return out


def test_one_token_buckets_match_rome_formula():
    traces = random_traces(40, seed=3)
    avg = aggregate(traces, n_boot=0)
    low = np.mean([t.low_score for t in traces])
    for name, pos in (("first_subject", lambda t: t.subject_span[0]), ("last_subject", lambda t: t.subject_span[1] - 1),
                      ("last", lambda t: len(t.tokens) - 1)):
        rome = np.mean([t.scores[pos(t)] for t in traces], axis=0) - low  # avg(scores[...]) - avg(low)
        # float64 means of 40 values in [-1, 1] added in other orders: 2 gamma(40, 2**-53) ~ 9e-15 < 1e-12
        np.testing.assert_allclose(avg.bucket(name), rome, rtol=0, atol=1e-12)
    np.testing.assert_allclose(avg.total_effect, np.mean([t.high_score - t.low_score for t in traces]), atol=1e-12)


def test_bootstrap_is_seeded_and_brackets_the_mean():
    traces = random_traces(60, seed=5)
    a = aggregate(traces, n_boot=200, seed=11)
    b = aggregate(traces, n_boot=200, seed=11)
    c = aggregate(traces, n_boot=200, seed=12)
    assert np.array_equal(a.indirect_ci, b.indirect_ci, equal_nan=True)
    assert not np.array_equal(a.indirect_ci, c.indirect_ci, equal_nan=True)
    last = BUCKETS.index("last_subject")
    lo, hi = a.indirect_ci[0, last], a.indirect_ci[1, last]
    assert (lo < a.indirect[last]).all() and (a.indirect[last] < hi).all()
    # a 95% interval is wider than a 50% one
    narrow = aggregate(traces, n_boot=200, seed=11, confidence=0.5)
    assert ((hi - lo) > (narrow.indirect_ci[1, last] - narrow.indirect_ci[0, last])).all()


def test_numba_and_numpy_results_identical_and_json_round_trip():
    traces = random_traces(30, seed=7)
    a = aggregate(traces, n_boot=50, seed=2, backend="numba")
    b = aggregate(traces, n_boot=50, seed=2, backend="numpy")
    assert json.dumps(a.to_dict()) == json.dumps(b.to_dict())
    back = EffectAverages.from_dict(json.loads(json.dumps(a.to_dict())))
    assert json.dumps(back.to_dict()) == json.dumps(a.to_dict())
    assert np.array_equal(back.indirect, a.indirect, equal_nan=True)
    assert back.peak("last_subject") == a.peak("last_subject")


def test_labels_and_bad_input():
    assert trace_label(make_trace(np.zeros((3, 2)), (0, 1), 0, 1, severed="mlp")) == "hidden-severed-mlp"
    mixed = random_traces(3) + random_traces(2, kind="mlp")
    with pytest.raises(DatasetError, match="mix kinds"):
        aggregate(mixed)
    with pytest.raises(DatasetError, match="different models"):
        aggregate(random_traces(2) + [replace(random_traces(1)[0], model="other")])
    with pytest.raises(DatasetError, match="no traces"):
        aggregate([])
    with pytest.raises(DatasetError, match="subject span"):
        ragged_from([(3, 2, 4)])
    with pytest.raises(DatasetError, match="layer counts"):
        aggregate(random_traces(2, n_layers=3) + random_traces(2, n_layers=4))


def test_untraced_rows_count_in_no_bucket():
    """A trace of the last subject token only gives that bucket's numbers of the full trace (and
    the same total effect); every other bucket is empty (NaN), not zero."""
    full = random_traces(12, seed=3)
    last_only = []
    for t in full:
        scores = np.full_like(t.scores, np.nan)
        scores[t.subject_span[1] - 1] = t.scores[t.subject_span[1] - 1]
        last_only.append(make_trace(scores, t.subject_span, t.low_score, t.high_score, severed="mlp"))
    for backend in ("numba", "numpy"):
        a = aggregate(full, n_boot=30, backend=backend)
        b = aggregate(last_only, n_boot=30, backend=backend)
        i = BUCKETS.index("last_subject")
        assert np.array_equal(a.indirect[i], b.indirect[i]) and np.array_equal(a.indirect_ci[:, i], b.indirect_ci[:, i])
        assert b.cells[i] == 12 and b.facts[i] == 12
        # the last subject token is also the first one for a one-token subject, and the last token
        # when the subject ends the prompt; nothing else is traced
        one_token = sum(t.subject_span[1] - t.subject_span[0] == 1 for t in full)
        at_end = sum(t.subject_span[1] == len(t.tokens) for t in full)
        assert b.cells.tolist() == [one_token, 0, 12, 0, 0, at_end]
        assert np.isnan(b.indirect[b.cells == 0]).all() and 0 < one_token < 12
        assert b.total_effect == pytest.approx(np.mean([t.high_score - t.low_score for t in full]), abs=1e-12)
        assert b.total_effect == pytest.approx(a.total_effect, abs=1e-12)
        assert b.peak_text("last") == "not traced" and b.peak_text("last_subject").startswith("layer ")
        assert "| – |" in layer_table({"x": b}, "last")


def test_bootstrap_sizes_and_seeds_are_refused_before_reading():
    """n_boot and seed are checked first (no trace needed); the resample array's memory too."""
    from tracer.errors import JobTooLargeError

    with pytest.raises(JobTooLargeError, match=r"n_boot=1000000000 is more than the 100000"):
        aggregate([], n_boot=10 ** 9)
    with pytest.raises(HyperParameterError, match=r"seed must be a whole number in \[0, 4294967295\]"):
        aggregate([], seed=2 ** 32)
    with pytest.raises(HyperParameterError, match=r"seed must be"):
        bucket_effects(ragged_from([(3, 0, 1)]), n_boot=2, seed=-1)
    r = ragged_from([(3, 0, 1), (4, 1, 3)])
    same = bucket_effects(r, n_boot=5, seed=2 ** 32 - 1)["boot"]
    np.testing.assert_array_equal(same, bucket_effects(r, n_boot=5, seed=2 ** 32 - 1)["boot"])
