"""ROME: rank-one update that maps k* to v*, engines agree, inputs validated, real edit works."""
from __future__ import annotations

import json

import pytest
import torch

from float32 import U32, U64, activation_tol, gamma, logprob_tol, mean_nll_tol
from tracer.edit import EditRequest, Ledger, ROMEHyperParams, compute_keys, compute_v, generate_context_templates, rome_edit
from tracer.edit import edited
from tracer.edit.rome import _next_token_probs
from tracer.edit.values import _build_rows, _Fast, _Reference
from tracer.targets import target_ids
from tracer.errors import EditError, HyperParameterError, StatisticsError, SubjectNotFoundError
from tracer.stats import KeyStatistics, StatsCache

REQUEST = EditRequest("{} is located in the city of", "The Eiffel Tower", " Rome")
SMALL = ((5, 2), (8, 2))  # fewer context templates keep tiny-model tests fast


def _weights(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def _module_weight(lm, layer):
    w = lm.model.get_submodule(lm.layers.mlp_out_name(layer)).weight.detach().double()
    return w.T if lm.layers.mlp_out_transposed else w


def _width(lm, templates, requests=(REQUEST,)) -> int:
    """A bound on the positions any engine's attention sums over: the longest row (template, prompt,
    target), twice over for the fast engine, which aligns the rows at their last subject token."""
    return 2 * max(len(lm.encode(t.replace("{}", r.text) + r.target_new)) + 2 for t in templates for r in requests)


def _mlp_terms(lm, layer, k, W=None):
    """``|W| |k| + |b|`` ("... d_out", float64): the sum of |terms| of the MLP output for key ``k``
    (``W`` "d_out d_k": the module's weight unless given)."""
    module = lm.model.get_submodule(lm.layers.mlp_out_name(layer))
    b = module.bias.detach().double().abs() if getattr(module, "bias", None) is not None else 0
    W = _module_weight(lm, layer) if W is None else W
    return k.double().abs() @ W.abs().T + b


def _tiny_edit(lm, **hp):
    hparams = ROMEHyperParams.for_model(lm, context_template_lengths=SMALL, v_num_grad_steps=5, **hp)
    return rome_edit(lm, REQUEST, hparams, stats="identity", progress=False)


@pytest.mark.parametrize("update", ["corrected", "original"])
def test_delta_is_rank_one_and_maps_key_to_value(tiny_lm, update):
    lm = tiny_lm
    before = _weights(lm)
    record = _tiny_edit(lm, update=update)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items()), "rome_edit changed the model"
    W0 = _module_weight(lm, record.layer)
    module = lm.model.get_submodule(record.module)
    with Ledger(lm) as ledger:
        ledger.apply(record)
        W1 = _module_weight(lm, record.layer)
        dW = W1 - W0
        s = torch.linalg.svdvals(dW)
        # W1 = fl32(W0 + ΔW) with ΔW = v uᵀ in float64: dW = ΔW + E, |E_ij| <= (u32 + u64)|W1_ij| (one
        # float32 rounding per entry, after a float64 addition), so by Weyl s[1] <= ||E||_2 <= ||E||_F.
        # The float64 outer product, the subtraction and the SVD add O(d u64 ||dW||_F).
        d = max(dW.shape)
        assert s[0] > 1e-3 and s[1] <= (U32 + U64) * (1 + U32) * W1.norm() + gamma(4 * d, U64) * dW.norm()
        # the edited projection maps the recorded key onto v* (bias included). In float64 ΔW k = v*
        # - (W0 k + b) (corrected form) or delta with v* = mlp_init + delta (original form, k the bare
        # prompt's key); in float32 the entries of W1 (u32), the key's rounding (u32) and the product of
        # length d_k plus the bias (gamma(d_k + 2)) add up to (2 u32 + gamma(d_k + 2)) (|W1||k| + |b|).
        # The original form also carries mlp_init, the MLP output read by the v* engine's own forward
        # pass, against W0 k + b from compute_keys' pass: two evaluations along the path to this block
        # (tests/float32.py, activation_tol). The float64 steps add gamma(4 d_k, u64) of the same scale.
        k = record.k_star
        bound = (2 * U32 + gamma(k.numel() + 2) + gamma(4 * k.numel(), U64)) * _mlp_terms(lm, record.layer, k, W1)
        if update == "original":
            width = _width(lm, record.context_templates)
            bound = bound + activation_tol(lm, width, record.layer + 1, _mlp_terms(lm, record.layer, k, W0))
        out = module(k.float()[None])[0].double()
        assert ((out - record.v_star).abs() <= bound).all(), float(((out - record.v_star).abs() / bound).max())
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


def test_corrected_form_uses_the_averaged_key(tiny_lm):
    lm = tiny_lm
    corrected, original = _tiny_edit(lm, update="corrected"), _tiny_edit(lm, update="original")
    # rome_edit reads its keys with this same call (same model, templates and shapes) and averages
    # them with the same float64 operations: the same bits (tests/float32.py)
    keys = compute_keys(lm, corrected.layer, [REQUEST], corrected.context_templates)[0].double()
    assert torch.equal(corrected.k_star, keys.mean(0))
    assert torch.equal(original.k_star, keys[0])
    # u = C⁻¹k* / ‖·‖ in both forms, from the same k* (the mean of all templates' keys) by the same
    # float64 operations
    assert torch.equal(corrected.u, original.u)


def test_fast_engine_matches_rome_reference_forward(tiny_lm):
    lm = tiny_lm
    hp = ROMEHyperParams.for_model(lm, v_num_grad_steps=6)
    templates = generate_context_templates(lm, SMALL, seed=3)
    fast = compute_v(lm, hp.layer, [REQUEST], templates, hp, engine="fast")
    ref = compute_v(lm, hp.layer, [REQUEST], templates, hp, engine="reference")
    assert fast.steps == ref.steps == 6
    assert fast.loss[-1, 0] < fast.loss[0, 0] and ref.loss[-1, 0] < ref.loss[0, 0]  # both make progress
    # The engines are two forward passes of other shapes (left-aligned rows and a key/value cache
    # against ROME's right-padded full pass): float32 sums in other orders (tests/float32.py).
    width = _width(lm, templates)
    # mlp_init: the MLP output at the bare prompt's last subject token, |W0||k| + |b| its scale
    k0 = compute_keys(lm, hp.layer, [REQUEST], templates)[0, 0]
    bound = activation_tol(lm, width, hp.layer + 1, _mlp_terms(lm, hp.layer, k0))
    assert ((fast.mlp_init.double() - ref.mlp_init.double()).abs() <= bound).all()
    # The optimisation trajectories are not compared: Adam divides each gradient component by its
    # own running size, so a rounding-level difference in a near-zero component can change a step by
    # up to the learning rate, and no useful a-priori bound follows. What the engines must agree on is
    # the forward pass at the same delta: at delta = 0 (the first loss) and at the fast run's delta.
    rows = _build_rows(lm, [REQUEST], templates, hp.kl_prompt)
    engines = _Fast(lm, hp.layer, rows), _Reference(lm, hp.layer, rows)
    lp_tols = []
    for delta in (torch.zeros_like(fast.delta), fast.delta):
        with torch.no_grad():
            (t_fast, kl_fast), (t_ref, kl_ref) = (e.forward(delta) for e in engines)
        lp_tols.append(logprob_tol(lm, width, float(torch.cat([t_ref, kl_ref.flatten()]).abs().max())))
        assert (t_fast - t_ref).abs().max() <= lp_tols[-1] and (kl_fast - kl_ref).abs().max() <= lp_tols[-1]
    # the first loss is the mean target NLL alone (delta = 0: the KL term is exactly 0)
    assert abs(float(fast.loss[0, 0] - ref.loss[0, 0])) <= mean_nll_tol(lp_tols[0], len(rows.targets),
                                                                         float(ref.loss[0, 0]))


def test_batched_requests_are_independent(tiny_lm):
    lm = tiny_lm
    hp = ROMEHyperParams.for_model(lm, v_num_grad_steps=4)
    templates = generate_context_templates(lm, SMALL, seed=0)
    other = EditRequest("{} plays the", "Miles Davis", " guitar")
    both = compute_v(lm, hp.layer, [REQUEST, other], templates, hp)
    alone = compute_v(lm, hp.layer, [other], templates, hp)
    # Two batches of other shapes: float32 sums in other orders (tests/float32.py). As in
    # test_fast_engine_matches_rome_reference_forward the trajectories have no a-priori bound; the
    # forward passes at the same delta do: request 1's log-probabilities in the batch of two against
    # its own, at delta = 0 and at its own run's delta (request 0's delta: 0 or anything).
    width = _width(lm, templates, (REQUEST, other))
    r_both, r_alone = (_build_rows(lm, reqs, templates, hp.kl_prompt) for reqs in ([REQUEST, other], [other]))
    fast_both, fast_alone = _Fast(lm, hp.layer, r_both), _Fast(lm, hp.layer, r_alone)
    n = len(r_alone.targets)
    lp_tols = []
    for delta in (torch.zeros_like(alone.delta), alone.delta):
        with torch.no_grad():
            t_both, kl_both = fast_both.forward(torch.cat([torch.ones_like(delta), delta]))
            t_alone, kl_alone = fast_alone.forward(delta)
        lp_tols.append(logprob_tol(lm, width, float(torch.cat([t_alone, kl_alone.flatten()]).abs().max())))
        assert (t_both[-n:] - t_alone).abs().max() <= lp_tols[-1]
        assert (kl_both[1] - kl_alone[0]).abs().max() <= lp_tols[-1]
    # the first loss is the mean target NLL alone (delta = 0: the KL term is exactly 0)
    assert abs(float(both.loss[0, 1] - alone.loss[0, 0])) <= mean_nll_tol(lp_tols[0], n, float(alone.loss[0, 0]))


def test_context_templates_are_deterministic_and_well_formed(tiny_lm):
    a = generate_context_templates(tiny_lm, SMALL, seed=1)
    assert a == generate_context_templates(tiny_lm, SMALL, seed=1)
    assert a[0] == "{}" and len(a) == 5 and all(t.count("{}") == 1 and t.endswith(". {}") for t in a[1:])
    record = _tiny_edit(tiny_lm)
    assert record.context_templates[0] == "{}" and len(record.context_templates) == 5


def test_context_templates_from_start_words(tiny_lm):
    """``template_starts="words"`` starts each template from TEMPLATE_STARTS in turn (sentences,
    not document fragments) and is what rome_edit uses when the settings ask for it."""
    words = generate_context_templates(tiny_lm, SMALL, seed=1, starts="words")
    assert words == generate_context_templates(tiny_lm, SMALL, seed=1, starts="words")
    assert words != generate_context_templates(tiny_lm, SMALL, seed=1)
    assert [t.startswith(w) for t, w in zip(words[1:], ["The", "Therefore", "The", "Therefore"])] == [True] * 4
    record = _tiny_edit(tiny_lm, template_starts="words")
    assert record.context_templates == generate_context_templates(tiny_lm, SMALL, seed=0, starts="words")
    with pytest.raises(HyperParameterError, match="template_starts"):
        ROMEHyperParams(layer=1, template_starts="bos")


def test_hparams_round_trip_and_validation(tiny_lm):
    hp = ROMEHyperParams.for_model(tiny_lm, v_lr=0.1)
    assert ROMEHyperParams.from_dict(json.loads(json.dumps(hp.to_dict()))) == hp
    assert 0 <= hp.layer < tiny_lm.n_layers and hp.v_lr == 0.1
    with pytest.raises(HyperParameterError, match="v_lr"):
        ROMEHyperParams(layer=1, v_lr=0)
    with pytest.raises(HyperParameterError, match="update"):
        ROMEHyperParams(layer=1, update="fancy")
    with pytest.raises(HyperParameterError, match="does not exist"):
        ROMEHyperParams.for_model(tiny_lm, layer=tiny_lm.n_layers)


def test_request_validation():
    assert EditRequest("The Eiffel Tower is in", "The Eiffel Tower", " Rome").prompt == "{} is in"
    assert REQUEST.text == "The Eiffel Tower is located in the city of"
    assert EditRequest.from_dict(REQUEST.to_dict()) == REQUEST
    with pytest.raises(SubjectNotFoundError, match="does not occur"):
        EditRequest("The Louvre is in", "The Eiffel Tower", " Rome")
    with pytest.raises(EditError, match="target_new is empty"):
        EditRequest("{} is in", "The Eiffel Tower", "  ")
    with pytest.raises(EditError, match="subject is empty"):
        EditRequest("{} is in", "", " Rome")
    with pytest.raises(EditError, match="nothing to change"):
        EditRequest("{} is in", "The Eiffel Tower", " Rome", " Rome")
    with pytest.raises(EditError, match="exactly once"):
        EditRequest("{} and {}", "X", " Rome")
    cf = {"requested_rewrite": {"prompt": "{} is in", "subject": "X", "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}}}
    assert EditRequest.from_counterfact(cf) == EditRequest("{} is in", "X", " Rome", " Paris")


def test_statistics_must_match_layer_and_model(tiny_lm, tmp_path):
    lm = tiny_lm
    hp = ROMEHyperParams.for_model(lm, context_template_lengths=SMALL, v_num_grad_steps=2)
    with pytest.raises(StatisticsError, match="layer"):
        rome_edit(lm, REQUEST, hp, stats=KeyStatistics.identity(lm, (hp.layer + 1) % lm.n_layers), progress=False)
    with pytest.raises(StatisticsError, match="'identity'"):
        rome_edit(lm, REQUEST, hp, stats="eye", progress=False)
    record = rome_edit(lm, REQUEST, hp, stats="identity", progress=False)
    assert record.statistics["kind"] == "identity"
    cached = rome_edit(lm, REQUEST, ROMEHyperParams.for_model(lm, context_template_lengths=SMALL, v_num_grad_steps=2,
                                                             stats_tokens=300, stats_chunk_tokens=64),
                       stats=StatsCache(tmp_path), progress=False)
    assert cached.statistics["kind"] == "second_moment" and cached.statistics["n_tokens"] == 300
    assert not torch.allclose(cached.u, record.u)


def test_bad_layer_and_subject_leave_model_untouched(tiny_lm):
    lm = tiny_lm
    before = _weights(lm)
    with pytest.raises(HyperParameterError):
        rome_edit(lm, REQUEST, ROMEHyperParams(layer=lm.n_layers + 3), stats="identity")
    with pytest.raises(EditError, match="context_templates"):
        rome_edit(lm, REQUEST, ROMEHyperParams.for_model(lm), stats="identity", context_templates=["no slot"])
    with pytest.raises(StatisticsError):
        rome_edit(lm, REQUEST, ROMEHyperParams.for_model(lm, stats_tokens=3), stats=None)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


# ---------------------------------------------------------------------------- the embedded model


@pytest.fixture(scope="module")
def eiffel(embedded, tmp_path_factory):
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    stats = StatsCache(tmp_path_factory.mktemp("stats")).get(embedded, 4, 4096, progress=False)
    record = rome_edit(embedded, REQUEST, ROMEHyperParams.for_model(embedded), stats=stats, progress=False)
    return record


@pytest.mark.embedded
def test_embedded_default_layer_is_traced_mlp_peak(embedded):
    hp = ROMEHyperParams.for_model(embedded)
    assert hp.layer == 4 and hp.update == "corrected" and hp.v_num_grad_steps == 20


@pytest.mark.embedded
def test_embedded_eiffel_tower_moves_to_rome(embedded, eiffel):
    from tracer.edit.check import predict

    record = eiffel
    assert record.before["top1"] == " Paris" and record.target_true == " Paris"
    assert record.after["top1"] == " Rome" and record.after["p_new"] > 0.5
    assert record.loss[-1] < record.loss[0] / 10
    prompts = ["The Eiffel Tower is located in the city of", "The Eiffel Tower, the famous landmark, stands in",
               "The Louvre is located in the city of"]
    weights = _weights(embedded)
    with edited(embedded, [record]):
        rewrite, para, louvre = predict(embedded, prompts, " Rome", " Paris")
    assert rewrite.top1 == " Rome"
    assert para.p_new > para.p_true
    assert louvre.p_true > louvre.p_new and louvre.top1 == " Paris"
    assert all(torch.equal(weights[k], v) for k, v in embedded.model.state_dict().items())
    restored = predict(embedded, prompts[:1], " Rome", " Paris")[0]
    assert restored.top1 == " Paris"
    # record.before came from this same function on the same prompt; the weights have their bits
    # back, so the probability is the same float32 computation: exactly equal (tests/float32.py)
    probs = _next_token_probs(embedded, REQUEST.text)
    assert float(probs[target_ids(embedded.tokenizer, " Paris")[0]]) == record.before["p_true"]
