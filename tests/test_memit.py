"""MEMIT: the closed-form update, exact revert / re-apply, failure safety, settings round-trip."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_model
from tracer.errors import EditError, HyperParameterError
from tracer.edit.memit import (MemitHyperParams, MemitRecord, Request, _extent, _key_rows, _keys_and_z, compute_memit,
                               compute_zs, solve_update)

REQS = [Request("Paris", "{} is the capital of", "Germany"), Request("the cat", "I saw {} in", "the garden"),
        Request("Rome", "The city of {} is in", "Spain")]


def _spd(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
    return a @ a.T / (2 * d) + 0.1 * torch.eye(d, dtype=torch.float64)


def _weights(lm, layers):
    return [lm.model.get_submodule(lm.layers.mlp_out_name(l)).weight.detach().clone() for l in layers]


def test_solve_update_is_the_least_squares_solution():
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(5, 12, generator=g, dtype=torch.float64)  # "n d_k"
    resid = torch.randn(5, 7, generator=g, dtype=torch.float64)  # "n out"
    C = _spd(12)
    lam = 3.0
    dw = solve_update(keys, resid, C, lam)
    K, R = keys.T, resid.T
    want = R @ K.T @ torch.linalg.inv(lam * C + K @ K.T)
    torch.testing.assert_close(dw, want, rtol=1e-9, atol=1e-10)
    # it minimises ||ΔW K - R||² + λ tr(ΔW C ΔWᵀ): the gradient vanishes
    grad = (dw @ K - R) @ K.T + lam * dw @ C
    assert grad.abs().max() < 1e-9


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_one_request_one_layer_equals_closed_form(family):
    lm = make_tiny_model(family)
    layer = 2
    hp = MemitHyperParams(layers=(layer,), v_steps=6, mom2_weight=0.5)
    C = _spd(lm.model.get_submodule(lm.layers.mlp_out_name(layer)).weight.shape[0 if family == "gpt2" else 1])
    templates = ("{}",)  # the key is then the bare prompt's key, where z is read
    req = [REQS[0]]
    z = compute_zs(lm, req, hp, templates, progress=False).z
    k, h = _keys_and_z(lm, _key_rows(lm, req, templates), layer, layer, batch_rows=8)
    w0 = _weights(lm, [layer])[0]
    record = compute_memit(lm, req, hp, statistics={layer: (C, {"kind": "given"})}, templates=templates, progress=False)
    K, r = k.double().T, (z - h).double().T  # one layer: the whole residual goes here
    want = r @ K.T @ torch.linalg.inv(0.5 * C + K @ K.T)
    torch.testing.assert_close(record.deltas[0].double(), want, rtol=1e-4, atol=1e-6)
    applied = lm.model.get_submodule(lm.layers.mlp_out_name(layer)).weight
    torch.testing.assert_close((applied - w0).T if family == "gpt2" else applied - w0, want.float(), rtol=1e-3, atol=1e-5)
    # the edited block output moves toward z by q/(λ+q) of the residual, q = kᵀC⁻¹k (Sherman-Morrison)
    _, h_new = _keys_and_z(lm, _key_rows(lm, req, templates), layer, layer, batch_rows=8)
    q = float(K[:, 0] @ torch.linalg.solve(C, K[:, 0]))
    torch.testing.assert_close((h_new - h).double(), (z - h).double() * q / (0.5 + q), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_keys_read_in_length_order_come_back_in_request_order(family):
    lm = make_tiny_model(family)
    templates = ("{}", "A long opening sentence about nothing much at all. {}", "Hi. {}")
    key_rows = _key_rows(lm, REQS, templates)
    lengths = [len(r.ids) for r in key_rows.rows]
    assert lengths == sorted(lengths) and not torch.equal(key_rows.where, torch.arange(len(lengths)))
    keys, z = _keys_and_z(lm, key_rows, 1, 2, batch_rows=4)  # chunks of 4 rows padded to their longest
    for q, req in enumerate(REQS):
        alone = [_keys_and_z(lm, _key_rows(lm, [req], (t,)), 1, 2, batch_rows=1) for t in templates]
        want_key = (alone[0][0][0] + torch.stack([k[0] for k, _ in alone[1:]]).mean(0)) / 2
        torch.testing.assert_close(keys[q], want_key, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(z[q], alone[0][1][0], rtol=1e-5, atol=1e-5)


def test_revert_and_reapply_are_bit_exact(tmp_path):
    lm = make_tiny_model("llama")
    hp = MemitHyperParams(layers=(1, 2), v_steps=4, mom2_weight=1.0)
    w0 = _weights(lm, hp.layers)
    first = compute_memit(lm, REQS[:2], hp, stats="identity", progress=False)
    w1 = _weights(lm, hp.layers)
    second = compute_memit(lm, REQS[2:], hp, stats="identity", progress=False)
    assert not all(torch.equal(a, b) for a, b in zip(w1, _weights(lm, hp.layers)))
    second.revert(lm)
    assert all(torch.equal(a, b) for a, b in zip(w1, _weights(lm, hp.layers)))
    first.revert(lm)
    assert all(torch.equal(a, b) for a, b in zip(w0, _weights(lm, hp.layers)))
    first.apply(lm)
    assert all(torch.equal(a, b) for a, b in zip(w1, _weights(lm, hp.layers)))
    with pytest.raises(EditError):
        first.apply(lm)
    first.save(tmp_path / "batch.safetensors")
    fresh = make_tiny_model("llama")
    loaded = MemitRecord.load(tmp_path / "batch.safetensors")
    loaded.apply(fresh)
    assert all(torch.equal(a, b) for a, b in zip(w1, _weights(fresh, hp.layers)))
    assert loaded.requests == first.requests and loaded.hparams == first.hparams
    loaded.revert(fresh)
    assert all(torch.equal(a, b) for a, b in zip(w0, _weights(fresh, hp.layers)))


def test_failure_midway_leaves_weights_untouched():
    lm = make_tiny_model("gpt2")
    hp = MemitHyperParams(layers=(1, 2), v_steps=2)
    w0 = _weights(lm, hp.layers)
    d_k = lm.model.get_submodule(lm.layers.mlp_out_name(1)).weight.shape[0]
    bad = {1: (torch.eye(d_k, dtype=torch.float64), {}), 2: (torch.eye(3, dtype=torch.float64), {})}  # wrong shape
    with pytest.raises(RuntimeError):
        compute_memit(lm, REQS[:1], hp, statistics=bad, templates=("{}",), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(w0, _weights(lm, hp.layers)))


def test_hyperparams_round_trip_and_validation():
    hp = MemitHyperParams(layers=(2, 3, 4), mom2_weight=100.0, chunk_requests=8)
    assert MemitHyperParams.from_dict(json.loads(json.dumps(hp.to_dict()))) == hp
    with pytest.raises(HyperParameterError):
        MemitHyperParams(layers=(3, 2))
    with pytest.raises(HyperParameterError):
        MemitHyperParams.from_dict({"layers": [1], "lambda": 3})
    lm = make_tiny_model("gptj")
    assert MemitHyperParams.for_model(lm).layers[-1] < lm.n_layers
    with pytest.raises(EditError):
        Request.coerce({"subject": "x", "prompt": "no subject here", "target_new": "y"})


def test_batched_z_equals_one_by_one():
    lm = make_tiny_model("gpt_neox")
    hp = MemitHyperParams(layers=(2,), v_steps=5)
    templates = ("{}", "Once. {}")
    both = compute_zs(lm, REQS[:2], hp, templates, progress=False).z
    one = torch.cat([compute_zs(lm, [r], hp, templates, progress=False).z for r in REQS[:2]])
    torch.testing.assert_close(both, one, rtol=1e-4, atol=1e-5)


def test_z_chunks_group_requests_by_length_and_keep_the_callers_order():
    lm = make_tiny_model("gpt_neox")
    hp = MemitHyperParams(layers=(2,), v_steps=5, chunk_requests=2)
    templates = ("{}", "Once. {}")
    reqs = [REQS[1], REQS[0], REQS[2]]  # extents (tokens fed per step) differ: chunking reorders them
    extents = [_extent(lm, r.edit_request()) for r in reqs]
    assert sorted(range(3), key=extents.__getitem__) != [0, 1, 2]
    got = compute_zs(lm, reqs, hp, templates, progress=False)
    for r, z, curve in zip(reqs, got.z, got.losses):
        alone = compute_zs(lm, [r], hp, templates, progress=False)
        torch.testing.assert_close(z, alone.z[0], rtol=1e-4, atol=1e-5)
        assert curve == pytest.approx(alone.losses[0], rel=1e-4)


def test_sequential_batches_report_health_and_revert():
    from tracer.edit.memit import sequential_memit

    lm = make_tiny_model("llama")
    hp = MemitHyperParams(layers=(1, 2), v_steps=3, mom2_weight=1.0)
    w0 = _weights(lm, hp.layers)
    records, health = sequential_memit(lm, REQS, 2, hp, stats="identity", texts=["The city of Paris is in France."],
                                       progress=False)
    assert [h.n_edits for h in health] == [0, 2, 3] and len(records) == 2
    assert all(v == 1.0 for v in health[0].norm_ratio.values())
    assert any(v != 1.0 for v in health[-1].norm_ratio.values()) and health[-1].perplexity > 1
    for r in reversed(records):
        r.revert(lm)
    assert all(torch.equal(a, b) for a, b in zip(w0, _weights(lm, hp.layers)))


def test_sequential_batches_take_given_statistics_and_reject_incomplete_ones():
    from tracer.edit.memit import load_statistics, sequential_memit

    lm = make_tiny_model("llama")
    hp = MemitHyperParams(layers=(1, 2), v_steps=3, mom2_weight=1.0)
    texts = ["Paris is in France."]
    w0 = _weights(lm, hp.layers)
    by_name, _ = sequential_memit(lm, REQS, 2, hp, stats="identity", texts=texts, progress=False)
    edited_by_name = _weights(lm, hp.layers)
    for r in reversed(by_name):
        r.revert(lm)
    given = load_statistics(lm, hp, "identity", progress=False)
    records, _ = sequential_memit(lm, REQS, 2, hp, statistics=given, texts=texts, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(edited_by_name, _weights(lm, hp.layers)))
    for r in reversed(records):
        r.revert(lm)
    with pytest.raises(HyperParameterError, match=r"lack layers \[2\]"):
        sequential_memit(lm, REQS, 2, hp, statistics={1: given[1]}, texts=texts, progress=False)
    with pytest.raises(HyperParameterError, match="must be a pair"):
        compute_memit(lm, REQS[:1], hp, statistics={1: given[1], 2: torch.eye(3)}, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(w0, _weights(lm, hp.layers)))


def test_sequential_batches_resume_from_checkpoint(tmp_path):
    """An interrupted sequence rerun with the same checkpoint directory recomputes no z and ends
    on the same weights; batch 2's z are keyed on the weights after batch 1."""
    from tracer.edit.memit import sequential_memit

    lm = make_tiny_model("llama")
    hp = MemitHyperParams(layers=(1, 2), v_steps=3, mom2_weight=1.0)
    w0 = _weights(lm, hp.layers)
    first, _ = sequential_memit(lm, REQS[:2], 2, hp, stats="identity", texts=["Paris is in France."], progress=False,
                                checkpoint_dir=tmp_path)
    assert first[0].timings["z_reused"] == 0
    first[0].revert(lm)
    records, _ = sequential_memit(lm, REQS, 2, hp, stats="identity", texts=["Paris is in France."], progress=False,
                                  checkpoint_dir=tmp_path)
    assert [r.timings["z_reused"] for r in records] == [2, 0]
    after = _weights(lm, hp.layers)
    for r in reversed(records):
        r.revert(lm)
    again, _ = sequential_memit(lm, REQS, 2, hp, stats="identity", texts=["Paris is in France."], progress=False,
                                checkpoint_dir=tmp_path)
    assert [r.timings["z_reused"] for r in again] == [2, 1]
    assert all(torch.equal(a, b) for a, b in zip(after, _weights(lm, hp.layers)))
    for r in reversed(again):
        r.revert(lm)
    assert all(torch.equal(a, b) for a, b in zip(w0, _weights(lm, hp.layers)))


@pytest.mark.slow
@pytest.mark.embedded
def test_embedded_memit_hundred_requests(embedded, shared_data):
    """100 CounterFact edits in one batch (C from 20k tokens per layer to keep it short): efficacy
    rises far above the unedited model's, neighbourhood prompts keep their answers, revert is exact.
    Measured with 100k-token C (bench/memit_scale.py, λ 1,500): ES 37 -> 97, PS 36 -> 84, NS 66 -> 65."""
    from tracer.evaluate import case_scores, load_cases, measure_probabilities, summarize

    cases = load_cases("counterfact-10k", limit=100, data_dir=shared_data)
    hp = MemitHyperParams.for_model(embedded, mom2_n_tokens=20_000)
    w0 = _weights(embedded, hp.layers)
    pre = summarize([case_scores(measure_probabilities(embedded, c)) for c in cases])
    record = compute_memit(embedded, cases, hp, progress=False)
    try:
        post = summarize([case_scores(measure_probabilities(embedded, c)) for c in cases])
    finally:
        record.revert(embedded)
    assert all(torch.equal(a, b) for a, b in zip(w0, _weights(embedded, hp.layers)))
    assert pre["ES"]["mean"] <= 45 and post["ES"]["mean"] >= 85
    assert post["PS"]["mean"] >= pre["PS"]["mean"] + 30
    assert post["NS"]["mean"] >= pre["NS"]["mean"] - 8


def test_z_checkpoints_resume_an_interrupted_batch(tmp_path, monkeypatch):
    import tracer.edit.rome as rome

    lm = make_tiny_model("llama")
    hp = MemitHyperParams(layers=(1, 2), v_steps=4, chunk_requests=2)
    whole = compute_zs(lm, REQS, hp, ("{}",), progress=False)
    ckpt = tmp_path / "z"
    real, calls = rome.compute_v, []

    def failing_second_chunk(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user stops the run during the second chunk
        return real(*a, **k)

    monkeypatch.setattr(rome, "compute_v", failing_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        compute_zs(lm, REQS, hp, ("{}",), progress=False, checkpoint_dir=ckpt)
    monkeypatch.setattr(rome, "compute_v", real)
    assert len(list(ckpt.glob("z-*.safetensors"))) == 1
    resumed = compute_zs(lm, REQS, hp, ("{}",), progress=False, checkpoint_dir=ckpt)
    assert resumed.reused == 2 and torch.equal(resumed.z, whole.z) and resumed.losses == whole.losses
    # the chunk written before the interruption recorded its time; the resumed run reports it
    assert resumed.reused_cost["untimed"] == 0 and resumed.reused_cost["cpu_s"] > 0 and resumed.reused_cost["wall_s"] > 0
    again = compute_zs(lm, REQS[::-1], hp, ("{}",), progress=False, checkpoint_dir=ckpt)  # any order, all cached
    assert again.reused == 3 and torch.equal(again.z, whole.z.flip(0))
    # other v* settings, templates or weights: nothing is reused
    assert compute_zs(lm, REQS[:1], MemitHyperParams(layers=(1, 2), v_steps=3), ("{}",), progress=False,
                      checkpoint_dir=ckpt).reused == 0
    assert compute_zs(lm, REQS[:1], hp, ("{}", "Hi. {}"), progress=False, checkpoint_dir=ckpt).reused == 0
    record = compute_memit(lm, REQS[:1], hp, stats="identity", templates=("{}",), progress=False)
    assert compute_zs(lm, REQS[:1], hp, ("{}",), progress=False, checkpoint_dir=ckpt).reused == 0
    record.revert(lm)
    # a torn file is skipped and its requests recomputed
    for f in ckpt.glob("z-*.safetensors"):
        f.write_bytes(b"torn")
    assert compute_zs(lm, REQS, hp, ("{}",), progress=False, checkpoint_dir=ckpt).reused == 0
