"""MEMIT: the closed-form update, exact revert / re-apply, failure safety, settings round-trip."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model
from float32 import U32, U64, activation_tol, gamma, logprob_tol, mean_nll_tol
from tracer.errors import EditError, HyperParameterError
from tracer.hooks import hooked
from tracer.edit import MemitHyperParams, MemitRecord, Request, WeightBook, load_records, save_records
from tracer.edit.keys import key_rows as _key_rows
from tracer.edit.memit import compute_memit, keys_and_z, solve_update
from tracer.edit.zs import compute_zs, extent

REQS = [Request("Paris", "{} is the capital of", "Germany"), Request("the cat", "I saw {} in", "the garden"),
        Request("Rome", "The city of {} is in", "Spain")]


def _spd(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
    return a @ a.T / (2 * d) + 0.1 * torch.eye(d, dtype=torch.float64)


def _within(got: torch.Tensor, want: torch.Tensor, bound) -> None:
    """``|got - want| <= bound`` element by element (``bound`` a tensor or a number)."""
    excess = float(((got - want).abs() / bound).max())
    assert excess <= 1, f"{excess:.3g} times the bound"


def _mlp_weight(lm, layer) -> tuple[torch.Tensor, torch.Tensor | float]:
    """The MLP output projection's weight ("d_out d_k", float64) and bias (or 0)."""
    module = lm.model.get_submodule(lm.layers.mlp_out_name(layer))
    w = module.weight.detach().double()
    b = module.bias.detach().double() if getattr(module, "bias", None) is not None else 0
    return (w.T if lm.layers.mlp_out_transposed else w), b


def _key_scale(lm, layer: int, ids: list[int], at: int) -> torch.Tensor:
    """How a float32 key ("d_k") at position ``at`` moves per unit of ``2 gamma(N)`` (tests/float32.py,
    activation_tol): the sums of |terms| of the MLP's input products there (``|W||x| + |b|``, float64),
    through the activation: ``1.13 t`` for one product (|GELU'| <= 1.13, |SiLU'| <= 1.1), ``2.1 t_gate
    t_up`` for a gated one (``|d(act(g) up)| <= 1.1 |up| |dg| + |act(g)| |d up|``, ``|act(g)| <= |g|``)."""
    mlp = lm.layers.name("mlp", layer)
    out = lm.layers.mlp_out_name(layer)
    children = {f"{mlp}.{n}": c for n, c in lm.model.get_submodule(mlp).named_children()
                if getattr(c, "weight", None) is not None and c.weight.dim() == 2 and f"{mlp}.{n}" != out}
    seen = {}
    with torch.no_grad(), hooked(lm.model, inputs={n: (lambda x, n=n: seen.__setitem__(n, x[0, at].double()))
                                                    for n in children}):
        lm.model(torch.tensor([ids]))
    terms = {}
    for n, c in children.items():
        w = c.weight.detach().double()
        w = w if type(c).__name__ == "Conv1D" else w.T  # "in out"
        b = c.bias.detach().double().abs() if getattr(c, "bias", None) is not None else 0
        terms[n.rsplit(".", 1)[1]] = seen[n].abs() @ w.abs() + b
    if len(terms) == 1:
        return 1.13 * next(iter(terms.values()))
    return 2.1 * terms["gate_proj"] * terms["up_proj"]


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
    torch.testing.assert_close(dw, want, rtol=1e-9, atol=1e-10)  # float64 on both sides (cond(A) ~ 10)
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
    k, h = keys_and_z(lm, _key_rows(lm, req, templates), layer, layer, batch_rows=8)
    w0 = _weights(lm, [layer])[0]
    record = compute_memit(lm, req, hp, statistics={layer: (C, {"kind": "given"})}, templates=templates, progress=False)
    K, r = k.double().T, (z - h).double().T  # one layer: the whole residual goes here
    A = 0.5 * C + K @ K.T
    want = r @ K.T @ torch.linalg.inv(A)
    # compute_memit reads the same z (compute_zs, same call) and the same k and h (_keys_and_z on the
    # one row: the same shapes), so only the solve differs: Cholesky against the inverse, both in
    # float64 with relative error <= cond(A) gamma(3 d_k + 2, u64) each (Higham, Thm 10.4 and §14.3,
    # to first order), then one rounding to float32 (u32 per entry)
    d_k = K.shape[0]
    f64 = 2 * float(torch.linalg.cond(A)) * gamma(3 * d_k + 2, U64) * float(want.abs().max())
    _within(record.deltas[0].double(), want, U32 * want.abs() + f64)
    applied = lm.model.get_submodule(lm.layers.mlp_out_name(layer)).weight
    W0, W1 = (w.detach().double().T if family == "gpt2" else w.detach().double() for w in (w0, applied))
    # applied = fl32(W0 + fl32(ΔW)) and the float32 subtraction below: u32 (|W1| + |ΔW|) more
    dW = ((applied - w0).T if family == "gpt2" else applied - w0).double()
    _within(dW, want, U32 * (W1.abs() + 3 * want.abs()) + f64)
    # the edited block output moves toward z by q/(λ+q) of the residual, q = kᵀC⁻¹k (Sherman-Morrison).
    # Below the MLP's output product nothing changed (the same bits in both passes), so h_new - h is
    # (W1 - W0) k plus the roundings of the two passes' product of length d_k, bias and residual
    # additions (gamma(d_k + 2) of |W| |k| + |b| + |h| each) and of the subtraction (u32)
    _, h_new = keys_and_z(lm, _key_rows(lm, req, templates), layer, layer, batch_rows=8)
    q = float(K[:, 0] @ torch.linalg.solve(C, K[:, 0]))
    module = lm.model.get_submodule(lm.layers.mlp_out_name(layer))
    b = module.bias.detach().double().abs() if getattr(module, "bias", None) is not None else 0
    kk = k.double().abs()[0]
    passes = gamma(d_k + 2) * ((W0.abs() + W1.abs()) @ kk + 2 * b + h.double().abs()[0] + h_new.double().abs()[0])
    moved = (z - h).double() * q / (0.5 + q)
    _within((h_new - h).double(), moved, passes + U32 * moved.abs() + (U32 * (W1.abs() + 3 * want.abs()) + f64) @ kk)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_keys_read_in_length_order_come_back_in_request_order(family):
    lm = make_tiny_model(family)
    templates = ("{}", "A long opening sentence about nothing much at all. {}", "Hi. {}")
    key_rows = _key_rows(lm, REQS, templates)
    lengths = [len(ids) for ids in key_rows.ids]
    assert lengths == sorted(lengths) and not torch.equal(key_rows.where, torch.arange(len(lengths)))
    keys, z = keys_and_z(lm, key_rows, 1, 2, batch_rows=4)  # chunks of 4 rows padded to their longest
    # Padded chunks against one row at a time: other shapes, so float32 sums in other orders along
    # the path (tests/float32.py, activation_tol; attention over the longest row). Keys: each
    # template's key within its bound (_key_scale); the average of averages passes on at most the
    # largest, and adds gamma(T + 1) |k| per side for its own roundings. z (block 2's output): its last
    # reductions are the MLP's output product and the residual addition, |W||k| + |b| + |z| + |mlp out|.
    width = max(lengths)
    w2, b2 = _mlp_weight(lm, 2)
    for q, req in enumerate(REQS):
        alone = [keys_and_z(lm, _key_rows(lm, [req], (t,)), 1, 2, batch_rows=1) for t in templates]
        want_key = (alone[0][0][0] + torch.stack([k[0] for k, _ in alone[1:]]).mean(0)) / 2
        rows = [_key_rows(lm, [req], (t,)) for t in templates]
        scale = torch.stack([_key_scale(lm, 1, list(r.ids[0]), r.lookup[0]) for r in rows]).max(0).values
        k_abs = torch.stack([k[0] for k, _ in alone]).double().abs().max()
        _within(keys[q].double(), want_key.double(),
                activation_tol(lm, width, 2, scale) + 2 * gamma(len(templates) + 1) * k_abs)
        k2 = keys_and_z(lm, _key_rows(lm, [req], ("{}",)), 2, 2, batch_rows=1)[0][0].double()
        mlp_out = k2 @ w2.T + b2
        z_scale = k2.abs() @ w2.abs().T + abs(b2) + alone[0][1][0].double().abs() + mlp_out.abs()
        _within(z[q].double(), alone[0][1][0].double(), activation_tol(lm, width, 3, z_scale))


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
    save_records([first], tmp_path / "batch.safetensors")
    fresh = make_tiny_model("llama")
    [loaded] = load_records(tmp_path / "batch.safetensors")
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
    both = compute_zs(lm, REQS[:2], hp, templates, progress=False)
    for q, r in enumerate(REQS[:2]):
        one = compute_zs(lm, [r], hp, templates, progress=False)
        # The z are ends of two float32 Adam trajectories of other batch shapes; Adam divides each
        # gradient component by its own running size, so a rounding-level difference in a near-zero
        # component can change a step by up to the learning rate: no useful a-priori bound exists
        # (test_rome.py compares the v* engines' forward passes at the same delta instead). The first
        # loss (delta = 0: the mean target NLL alone, the KL term exactly 0) is a forward pass of each
        # batch: its log-probabilities differ by logprob_tol (tests/float32.py), every |log p| is at
        # most n_terms x NLL (all are <= 0), and the rows fit in twice the longest row (the engine
        # aligns them at the subject's last token).
        er = [x.edit_request() for x in REQS[:2]]
        n_terms = len(templates) * len(lm.tokenizer(er[q].target_new, add_special_tokens=False)["input_ids"])
        width = 2 * max(len(lm.encode(t.replace("{}", x.text) + x.target_new)) + 2 for x in er for t in templates)
        nll = max(both.losses[q][0], one.losses[0][0])
        tol = mean_nll_tol(logprob_tol(lm, width, n_terms * nll), n_terms, nll)
        assert abs(both.losses[q][0] - one.losses[0][0]) <= tol
        assert torch.isfinite(both.z[q]).all() and not torch.equal(both.z[q], both.z[1 - q])


def test_z_chunks_group_requests_by_length_and_keep_the_callers_order():
    lm = make_tiny_model("gpt_neox")
    hp = MemitHyperParams(layers=(2,), v_steps=5, chunk_requests=2)
    templates = ("{}", "Once. {}")
    reqs = [REQS[1], REQS[0], REQS[2]]  # extents (tokens fed per step) differ: chunking reorders them
    extents = [extent(lm, r.edit_request()) for r in reqs]
    assert sorted(range(3), key=extents.__getitem__) != [0, 1, 2]
    assert len(set(extents)) == 3  # so both calls below form the same chunks
    got = compute_zs(lm, reqs, hp, templates, progress=False)
    # Another caller order: the requests are sorted by their (distinct) extents, so both calls run the
    # same chunks, the same float32 computations: each request's z and loss curve have the same bits,
    # only the caller's order differs (tests/float32.py). (Chunk against one request alone: other
    # shapes, see test_batched_z_equals_one_by_one.)
    order = [2, 0, 1]
    other = compute_zs(lm, [reqs[i] for i in order], hp, templates, progress=False)
    for j, i in enumerate(order):
        assert torch.equal(got.z[i], other.z[j]) and got.losses[i] == other.losses[j]
    assert not torch.equal(got.z[0], got.z[1])


def test_sequential_batches_report_health_and_revert():
    from tracer.edit import sequential_memit

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
    from tracer.edit import load_statistics, sequential_memit

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
    from tracer.edit import sequential_memit

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


@pytest.mark.embedded
def test_embedded_memit_eight_requests(embedded, shared_data):
    """The default run's embedded check (the 100-request one is ``slow``): 8 CounterFact edits in one
    batch, 6 z steps, C = I with λ = 10, about 40 CPU-seconds. Measured: ES 12.5 -> 87.5,
    PS 12.5 -> 75, NS 75 -> 75; each margin below allows one case (12.5 points) to flip. The model's
    book keeps one CPU copy of the 5 edited matrices (17.7 MB) to revert exactly, and revert is exact."""
    from tracer.evaluate import case_scores, load_cases, measure_probabilities, summarize

    cases = load_cases("counterfact-10k", limit=8, data_dir=shared_data)
    hp = MemitHyperParams.for_model(embedded, v_steps=6, mom2_weight=10.0)
    w0 = _weights(embedded, hp.layers)
    pre = summarize([case_scores(measure_probabilities(embedded, c)) for c in cases])
    record = compute_memit(embedded, cases, hp, stats="identity", progress=False)
    try:
        post = summarize([case_scores(measure_probabilities(embedded, c)) for c in cases])
        assert WeightBook.of(embedded).held_bytes == sum(w.numel() * w.element_size() for w in w0)
    finally:
        record.revert(embedded)
    assert all(torch.equal(a, b) for a, b in zip(w0, _weights(embedded, hp.layers)))
    assert pre["ES"]["mean"] <= 25 and post["ES"]["mean"] >= 75
    assert post["PS"]["mean"] >= pre["PS"]["mean"] + 40
    assert post["NS"]["mean"] >= pre["NS"]["mean"] - 15


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
    import tracer.edit.zs as zs

    lm = make_tiny_model("llama")
    hp = MemitHyperParams(layers=(1, 2), v_steps=4, chunk_requests=2)
    whole = compute_zs(lm, REQS, hp, ("{}",), progress=False)
    ckpt = tmp_path / "z"
    real, calls = zs.compute_v, []

    def failing_second_chunk(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user stops the run during the second chunk
        return real(*a, **k)

    monkeypatch.setattr(zs, "compute_v", failing_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        compute_zs(lm, REQS, hp, ("{}",), progress=False, checkpoint_dir=ckpt)
    monkeypatch.setattr(zs, "compute_v", real)
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


# ---------------------------------------------------------------------------- weights that cannot go bad silently


def _one_line(info, *names):
    message = str(info.value)
    assert "\n" not in message and all(n in message for n in names), message
    return message


@pytest.fixture(scope="module")
def llama_batches():
    """A tiny Llama and two MEMIT batches (layers 1-2) computed on it, unapplied."""
    lm = make_tiny_model("llama")
    hp = MemitHyperParams(layers=(1, 2), v_steps=3, mom2_weight=1.0)
    first = compute_memit(lm, REQS[:2], hp, stats="identity", templates=("{}",), progress=False, apply=False)
    second = compute_memit(lm, REQS[2:], hp, stats="identity", templates=("{}",), progress=False, apply=False)
    return lm, hp, first, second


def test_a_non_finite_update_or_z_is_refused_and_the_model_unchanged(monkeypatch):
    import tracer.edit.memit as memit

    lm = make_tiny_model("gpt2")
    hp = MemitHyperParams(layers=(1, 2), v_steps=2)
    w0 = _weights(lm, hp.layers)
    real, calls = memit.solve_update, []

    def nan_on_second_layer(*a, **k):
        calls.append(1)
        dw = real(*a, **k)
        return dw.fill_(float("nan")) if len(calls) == 2 else dw

    monkeypatch.setattr(memit, "solve_update", nan_on_second_layer)
    with pytest.raises(EditError) as info:
        compute_memit(lm, REQS[:1], hp, stats="identity", templates=("{}",), progress=False)
    _one_line(info, "layer 2", "not finite", "unchanged")
    assert all(torch.equal(a, b) for a, b in zip(w0, _weights(lm, hp.layers)))
    monkeypatch.setattr(memit, "solve_update", real)
    real_zs = memit.compute_zs

    def nan_z(*a, **k):
        res = real_zs(*a, **k)
        res.z[0, 3] = float("nan")
        return res

    monkeypatch.setattr(memit, "compute_zs", nan_z)
    with pytest.raises(EditError) as info:
        compute_memit(lm, REQS[:2], hp, stats="identity", templates=("{}",), progress=False)
    _one_line(info, "not finite", "Paris is the capital of")
    assert all(torch.equal(a, b) for a, b in zip(w0, _weights(lm, hp.layers)))


def _z_file(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["factscope_z"]), f.get_tensor("z")


def _put_z_file(path, meta, z):
    from safetensors.torch import save_file

    save_file({"z": z}, str(path), metadata={"factscope_z": json.dumps(meta)})


Z_CORRUPTIONS = {
    "NaN z": (lambda m, z: (m, z.clone().fill_(float("nan"))), "non-finite"),
    "z of another width": (lambda m, z: (m, torch.zeros(z.shape[0], z.shape[1] + 1)), "shape"),
    "z of fewer rows": (lambda m, z: (m, z[:1].clone()), "shape"),
    "z as float64": (lambda m, z: (m, z.double()), "float64"),
    "keys not a list": (lambda m, z: ({**m, "keys": ",".join(m["keys"])}, z), "'keys'"),
    "missing losses": (lambda m, z: ({k: v for k, v in m.items() if k != "losses"}, z), "'losses'"),
    "losses of strings": (lambda m, z: ({**m, "losses": [["x"]] * len(m["keys"])}, z), "'losses'"),
    "losses too few": (lambda m, z: ({**m, "losses": m["losses"][:1]}, z), "'losses'"),
    "seconds a string": (lambda m, z: ({**m, "cpu_s": "1"}, z), "'cpu_s'"),
    "metadata a list": (lambda m, z: ([m], z), "'keys'"),
}


@pytest.mark.parametrize("case", sorted(Z_CORRUPTIONS))
def test_a_bad_z_checkpoint_is_skipped_with_a_warning_and_recomputed(tmp_path, caplog, case):
    """A z file whose fields fail their checks is never used: a warning names it and the field, and its
    requests are optimised again, giving the z of an uninterrupted run."""
    lm = make_tiny_model("llama")
    hp = MemitHyperParams(layers=(1, 2), v_steps=3, chunk_requests=2)
    whole = compute_zs(lm, REQS[:2], hp, ("{}",), progress=False)
    compute_zs(lm, REQS[:2], hp, ("{}",), progress=False, checkpoint_dir=tmp_path)
    (path,) = tmp_path.glob("z-*.safetensors")
    change, words = Z_CORRUPTIONS[case]
    _put_z_file(path, *change(*_z_file(path)))
    caplog.clear()
    again = compute_zs(lm, REQS[:2], hp, ("{}",), progress=False, checkpoint_dir=tmp_path)
    assert again.reused == 0 and torch.equal(again.z, whole.z) and again.losses == whole.losses
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warning) == 1 and path.name in warning[0] and words in warning[0], warning


def test_apply_writes_every_layer_or_none(llama_batches, monkeypatch):
    lm, hp, first, _ = llama_batches
    w0 = _weights(lm, hp.layers)

    def variant(*deltas):
        return MemitRecord(requests=first.requests, hparams=first.hparams, modules=first.modules, deltas=list(deltas),
                           templates=first.templates, stats=first.stats, z_losses=first.z_losses, timings=first.timings)

    d0, d1 = first.deltas
    bad = {"another shape": (variant(d0, d1[:, :-1]), ("shape", "nothing was applied")),
           "NaN": (variant(d0, d1.clone().fill_(float("nan"))), ("non-finite", "nothing was applied"))}
    failures = []
    for name, (record, words) in bad.items():
        try:
            with pytest.raises(EditError) as info:
                record.apply(lm)
            _one_line(info, *words)
        except BaseException as e:  # noqa: BLE001 - collected below
            failures.append(f"{name}: {type(e).__name__}")
        if not all(torch.equal(a, b) for a, b in zip(w0, _weights(lm, hp.layers))):
            failures.append(f"{name}: weights changed")
            for w, o in zip([lm.model.get_submodule(m).weight for m in first.modules], w0):
                with torch.no_grad():
                    w.copy_(o)
    assert failures == []
    # a ΔW finite in float32 that overflows float16 weights
    half = make_tiny_model("llama")
    for m in first.modules:
        half.model.get_submodule(m).half()
    h0 = _weights(half, hp.layers)
    with pytest.raises(EditError) as info:
        variant(d0, torch.full_like(d1, 1e5)).apply(half)
    _one_line(info, "non-finite in torch.float16", "nothing was applied")
    assert all(torch.equal(a, b) for a, b in zip(h0, _weights(half, hp.layers)))
    # a failure while writing the second layer restores the first, bit for bit
    real, calls = WeightBook._write, []

    def fail_second(self, *a):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("out of memory")
        return real(self, *a)

    monkeypatch.setattr(WeightBook, "_write", fail_second)
    with pytest.raises(MemoryError):
        first.apply(lm)
    monkeypatch.setattr(WeightBook, "_write", real)
    assert not first.applied and all(torch.equal(a, b) for a, b in zip(w0, _weights(lm, hp.layers)))
    assert WeightBook.of(lm).held_bytes == 0


def test_batches_revert_in_any_order_and_a_change_behind_their_back_is_refused(llama_batches):
    lm, hp, first, second = llama_batches
    w0 = _weights(lm, hp.layers)
    second.apply(lm)
    only_second = _weights(lm, hp.layers)
    second.revert(lm)
    first.apply(lm)
    w1 = _weights(lm, hp.layers)
    second.apply(lm)
    w2 = _weights(lm, hp.layers)
    first.revert(lm)  # out of order: the weights are those of the set left, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(only_second, _weights(lm, hp.layers)))
    first.apply(lm)
    assert all(torch.equal(a, b) for a, b in zip(w2, _weights(lm, hp.layers)))
    second.revert(lm)
    assert all(torch.equal(a, b) for a, b in zip(w1, _weights(lm, hp.layers)))
    w = lm.model.get_submodule(first.modules[1]).weight
    with torch.no_grad():
        w.view(-1)[0] += 1.0  # a change behind the book's back
    with pytest.raises(EditError) as info:
        first.revert(lm)
    _one_line(info, first.modules[1], "was changed outside")
    assert first.applied  # nothing was written
    with torch.no_grad():
        w.copy_(w1[1])
    first.revert(lm)
    assert all(torch.equal(a, b) for a, b in zip(w0, _weights(lm, hp.layers)))


def test_an_applied_batch_keeps_one_copy_of_each_edited_weight_on_the_cpu(llama_batches):
    """Exact revert in any order needs the original bits: the book keeps one copy of each edited
    matrix, on the CPU, while an edit is applied there, and nothing once everything is reverted."""
    lm, hp, first, second = llama_batches
    weights = [lm.model.get_submodule(m).weight for m in first.modules]
    matrix_bytes = sum(w.numel() * w.element_size() for w in weights)
    book = WeightBook.of(lm)
    first.apply(lm)
    second.apply(lm)
    try:
        assert book.held_bytes == matrix_bytes
        assert all(t.device.type == "cpu" for t in book._original.values())
    finally:
        first.revert(lm)
        second.revert(lm)
    assert book.held_bytes == 0 and not first.applied


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_revert_is_exact_where_subtraction_is_not(llama_batches, dtype):
    """fl(fl(w + d) − d) misses w for many elements when d is large; revert gives the bits back in
    every dtype (the book recomposes from the original instead of subtracting)."""
    _, hp, first, _ = llama_batches
    lm = make_tiny_model("llama")
    for m in first.modules:
        lm.model.get_submodule(m).to(dtype)
    big = MemitRecord(requests=first.requests, hparams=first.hparams, modules=first.modules,
                      deltas=[d * 100 for d in first.deltas], templates=first.templates, stats=first.stats,
                      z_losses=first.z_losses, timings=first.timings)
    w0 = _weights(lm, hp.layers)
    big.apply(lm)
    w = lm.model.get_submodule(first.modules[0]).weight
    d = big.deltas[0].T if lm.layers.mlp_out_transposed else big.deltas[0]
    assert not torch.equal(w - d.to(dtype), w0[0])  # subtracting would not restore the bits
    big.revert(lm)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert all(torch.equal(a.view(bits), b.view(bits)) for a, b in zip(w0, _weights(lm, hp.layers)))


def _saved(record, path):
    """The record's dict and tensors (named ``delta.i``) as the one file format holds them."""
    save_records([record], path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["factscope_ledger"])
        tensors = {k.split(".", 1)[1]: f.get_tensor(k) for k in f.keys()}
    return meta["records"][0], tensors


def _put(path, record_meta, tensors):
    from safetensors.torch import save_file

    save_file({f"0.{k}": v for k, v in tensors.items()}, str(path),
              {"factscope_ledger": json.dumps({"format": 3, "records": [record_meta]})})
    return path


RECORD_FILE_CASES = {
    "missing modules": (lambda m, t: m.pop("modules"), "lacks field 'modules'"),
    "modules a string": (lambda m, t: m.update(modules="x"), "'modules' must be"),
    "missing requests": (lambda m, t: m.pop("requests"), "lacks field 'requests'"),
    "requests of numbers": (lambda m, t: m.update(requests=[1]), "'requests'"),
    "hparams layers bad": (lambda m, t: m["hparams"].update(layers=["a"]), "hparams"),
    "hparams unknown key": (lambda m, t: m["hparams"].update(bogus=1), "hparams"),
    "hparams fewer layers": (lambda m, t: m["hparams"].update(layers=[1]), "'hparams' edits 1 layers"),
    "hparams seed a string": (lambda m, t: m["hparams"].update(seed="0"), "'seed' must be an integer"),
    "hparams lambda a bool": (lambda m, t: m["hparams"].update(mom2_weight=True), "'mom2_weight' must be a finite"),
    "z_losses of strings": (lambda m, t: m.update(z_losses=[["x"]]), "'z_losses'"),
    "timings NaN": (lambda m, t: m["timings"].update(z_s=float("nan")), "'timings'"),
    "templates missing": (lambda m, t: m.pop("templates"), "lacks field 'templates'"),
    "fingerprints keys": (lambda m, t: m.update(fingerprints={"x": "y"}), "'fingerprints'"),
    "format 9": (lambda m, t: m.update(format=9), "format 2"),
    "JSON a list": (lambda m, t: m.update(__list__=True), "JSON object"),
    "not MEMIT": (lambda m, t: m.update(method="ROME"), "lacks tensor '0.u'"),
    "missing tensor": (lambda m, t: t.pop("delta.1"), "lacks tensor '0.delta.1'"),
    "extra tensor": (lambda m, t: t.update({"delta.7": torch.zeros(2, 2)}), "tensor '0.delta.7', which no record names"),
    "delta one-dimensional": (lambda m, t: t.update({"delta.0": t["delta.0"][0]}), "'delta.0' must be"),
    "deltas of two shapes": (lambda m, t: t.update({"delta.0": t["delta.0"][:, :-1].contiguous()}), "differ in shape"),
    "delta NaN": (lambda m, t: t["delta.1"].view(-1).__setitem__(0, float("nan")), "non-finite"),
    "delta edited": (lambda m, t: t["delta.1"].view(-1).__setitem__(0, 1.0), "does not verify"),
    "lambda edited": (lambda m, t: m["hparams"].update(mom2_weight=7.0), "does not verify"),
    "templates edited": (lambda m, t: m["templates"].append("Hi. {}"), "does not verify"),
    "fingerprint edited": (lambda m, t: m["fingerprints"].update({"1": "0" * 16}), "does not verify"),
}


@pytest.mark.parametrize("case", sorted(RECORD_FILE_CASES))
def test_malformed_or_edited_record_files_are_one_line_errors(llama_batches, tmp_path, case):
    _, _, first, _ = llama_batches
    meta, tensors = _saved(first, tmp_path / "good.safetensors")
    assert load_records(tmp_path / "good.safetensors")[0].id == first.id
    change, words = RECORD_FILE_CASES[case]
    change(meta, tensors)
    if meta.pop("__list__", False):
        meta = [meta]
    path = _put(tmp_path / "bad.safetensors", meta, tensors)
    with pytest.raises(EditError) as info:
        load_records(path)
    _one_line(info, str(path), words)


def test_truncated_missing_or_foreign_record_files_are_one_line_errors(llama_batches, tmp_path):
    _, _, first, _ = llama_batches
    path = tmp_path / "r.safetensors"
    save_records([first], path)
    body = path.read_bytes()
    for name, write, words in (("truncated", lambda: path.write_bytes(body[: len(body) // 2]), "not a factscope ledger"),
                               ("not safetensors", lambda: path.write_text("hello"), "not a factscope ledger"),
                               ("missing", lambda: path.unlink(), "does not exist")):
        save_records([first], path)
        write()
        with pytest.raises(EditError) as info:
            load_records(path)
        _one_line(info, str(path), words)


def test_format_1_record_files_still_load(tmp_path):
    """Records saved before ids covered every field load (by their own rule), apply and revert exactly."""
    path = Path(__file__).parent / "data" / "legacy-edits" / "memit-format1.safetensors"
    [record] = load_records(path)  # the two-file form MEMIT batches had before the one file format
    assert record.legacy_id == "9b6427dd0f4ad27f" and record.id != record.legacy_id
    fresh = make_tiny_model("llama")
    w0 = _weights(fresh, record.layers)
    record.apply(fresh)
    assert not all(torch.equal(a, b) for a, b in zip(w0, _weights(fresh, record.layers)))
    record.revert(fresh)
    assert all(torch.equal(a, b) for a, b in zip(w0, _weights(fresh, record.layers)))
    save_records([record], tmp_path / "new.safetensors")
    assert not Path(str(tmp_path / "new.safetensors") + ".json").exists()
    assert load_records(tmp_path / "new.safetensors")[0].id == record.id
    meta = json.loads(Path(str(path) + ".json").read_text())
    meta["modules"] = meta["modules"][::-1]  # covered by the old rule too
    (tmp_path / "old.safetensors").write_bytes(path.read_bytes())
    Path(str(tmp_path / "old.safetensors") + ".json").write_text(json.dumps(meta))
    with pytest.raises(EditError, match="does not verify"):
        load_records(tmp_path / "old.safetensors")
