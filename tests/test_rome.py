"""ROME: rank-one update that maps k* to v*, engines agree, inputs validated, real edit works."""
from __future__ import annotations

import json

import pytest
import torch

from tracer.edit import EditRequest, Ledger, ROMEHyperParams, compute_keys, compute_v, generate_context_templates, rome_edit
from tracer.edit.ledger import edited
from tracer.errors import EditError, HyperParameterError, StatisticsError, SubjectNotFoundError
from tracer.stats import KeyStatistics, StatsCache

REQUEST = EditRequest("{} is located in the city of", "The Eiffel Tower", " Rome")
SMALL = ((5, 2), (8, 2))  # fewer context templates keep tiny-model tests fast


def _weights(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def _module_weight(lm, layer):
    w = lm.model.get_submodule(lm.layers.mlp_out_name(layer)).weight.detach().double()
    return w.T if lm.layers.mlp_out_transposed else w


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
        dW = _module_weight(lm, record.layer) - W0
        s = torch.linalg.svdvals(dW)
        assert s[0] > 1e-3 and s[1] / s[0] < 1e-5  # float32 rounding only
        # the edited projection maps the recorded key onto v* (bias included)
        out = module(record.k_star.float()[None])[0].double()
        assert torch.allclose(out, record.v_star, atol=1e-3 * record.v_star.norm().item())
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


def test_corrected_form_uses_the_averaged_key(tiny_lm):
    lm = tiny_lm
    corrected, original = _tiny_edit(lm, update="corrected"), _tiny_edit(lm, update="original")
    keys = compute_keys(lm, corrected.layer, [REQUEST], corrected.context_templates)[0].double()
    assert torch.allclose(corrected.k_star, keys.mean(0), atol=1e-5)
    assert torch.allclose(original.k_star, keys[0], atol=1e-5)
    assert torch.allclose(corrected.u, original.u)  # u = C⁻¹k* / ‖·‖ in both forms


def test_fast_engine_matches_rome_reference_forward(tiny_lm):
    lm = tiny_lm
    hp = ROMEHyperParams.for_model(lm, v_num_grad_steps=6)
    templates = generate_context_templates(lm, SMALL, seed=3)
    fast = compute_v(lm, hp.layer, [REQUEST], templates, hp, engine="fast")
    ref = compute_v(lm, hp.layer, [REQUEST], templates, hp, engine="reference")
    assert fast.steps == ref.steps == 6
    assert torch.allclose(fast.loss, ref.loss, rtol=1e-4, atol=1e-5)
    assert torch.allclose(fast.delta, ref.delta, rtol=1e-3, atol=1e-4 * ref.delta.norm().item())
    assert torch.allclose(fast.mlp_init, ref.mlp_init, atol=1e-5)
    assert fast.loss[-1, 0] < fast.loss[0, 0]  # the optimisation makes progress


def test_batched_requests_are_independent(tiny_lm):
    lm = tiny_lm
    hp = ROMEHyperParams.for_model(lm, v_num_grad_steps=4)
    templates = generate_context_templates(lm, SMALL, seed=0)
    other = EditRequest("{} plays the", "Miles Davis", " guitar")
    both = compute_v(lm, hp.layer, [REQUEST, other], templates, hp)
    alone = compute_v(lm, hp.layer, [other], templates, hp)
    assert torch.allclose(both.loss[:, 1], alone.loss[:, 0], rtol=1e-4, atol=1e-5)
    assert torch.allclose(both.delta[1], alone.delta[0], rtol=1e-3, atol=1e-4 * alone.delta.norm().item())


def test_context_templates_are_deterministic_and_well_formed(tiny_lm):
    a = generate_context_templates(tiny_lm, SMALL, seed=1)
    assert a == generate_context_templates(tiny_lm, SMALL, seed=1)
    assert a[0] == "{}" and len(a) == 5 and all(t.count("{}") == 1 and t.endswith(". {}") for t in a[1:])
    record = _tiny_edit(tiny_lm)
    assert record.context_templates[0] == "{}" and len(record.context_templates) == 5


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
    assert restored.top1 == " Paris" and abs(restored.p_true - record.before["p_true"]) < 1e-5
