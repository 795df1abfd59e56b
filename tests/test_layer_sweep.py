"""Layer sweeps (tracer.layer_sweep, factscope layer-sweep): a fact edited at each layer beside its
trace, and the localisation-vs-editing correlation over many facts."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import make_tiny_model
from tracer.edit import ROMEHyperParams, edited, rome_edit
from tracer.edit.calibrate import last_subject_effects
from tracer.edit.requests import EditRequest
from tracer.edit.templates import rome_templates
from tracer.errors import HyperParameterError
from tracer.evaluate import Case, case_scores
from tracer.evaluate.metrics import measure_probabilities
from tracer.layer_sweep import LayerSweep, layer_sweep, localisation_correlation

ROME = {"stats": "identity", "v_num_grad_steps": 8, "context_template_lengths": ((4, 2),)}

CASE = Case(case_id=0, dataset="counterfact", subject="The tower", prompt="{} is located in", target_new="Rome",
            target_true="Paris", paraphrase_prompts=("People say that The tower is in",),
            neighborhood_prompts=("The museum is located in", "The bridge is located in"), specificity_targets=("Paris",) * 2)


def test_sweep_scores_are_the_edits_at_each_layer():
    lm = make_tiny_model("gpt2")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    sweep = layer_sweep(lm, CASE, [0, 2], samples=3, greedy_tokens=4, progress=False, **ROME)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())  # every edit reverted
    assert sweep.layers == (0, 2) and len(sweep.effect) == 4 and len(sweep.scores) == 2
    effect, _ = last_subject_effects(lm, CASE.rewrite_prompt, CASE.subject, samples=3)
    np.testing.assert_allclose(sweep.effect, effect)
    # layer 2's row is a ROME edit at layer 2 with the same templates, measured as evaluate measures
    hp = ROMEHyperParams.for_model(lm, layer=2, v_num_grad_steps=8, context_template_lengths=((4, 2),))
    templates = rome_templates(lm, hp)
    record = rome_edit(lm, EditRequest(CASE.prompt, CASE.subject, " Rome", " Paris"), hp, "identity",
                       context_templates=templates, progress=False)
    pre = measure_probabilities(lm, CASE)
    with edited(lm, [record]):
        post = measure_probabilities(lm, CASE)
    for k, v in case_scores(post).items():
        assert sweep.scores[1][k] == pytest.approx(v, abs=1e-6), k
    p0, p1 = math.exp(-pre["rewrite"][0]["nll_new"]), math.exp(-post["rewrite"][0]["nll_new"])
    assert sweep.scores[1]["rewrite_score"] == pytest.approx((p1 - p0) / (1 - p0), abs=1e-6)
    assert sweep.scores[1]["neighborhood_kl"] > 0  # (random tiny models barely take ROME edits: no claim on their size)
    assert LayerSweep.from_dict(json.loads(json.dumps(sweep.to_dict()))) == sweep
    table = sweep.markdown()
    assert table.splitlines()[0].startswith("| layer | MLP effect | ES |") and len(table.splitlines()) == 4
    with pytest.raises(HyperParameterError, match="distinct layers"):
        layer_sweep(lm, CASE, [0, 4], progress=False, **ROME)


def _fake(effect, score, layers=(0, 1, 2)):
    return LayerSweep(case={}, model="m", layers=layers, effect=tuple(effect), before={},
                      scores=tuple({"rewrite_score": s} for s in score), settings={}, seconds={})


def test_localisation_correlation_known_answers():
    rng = np.random.default_rng(0)
    # the score is the layer's mean plus the trace effect's deviation from it: within-layer r = 1
    layer_means = np.array([0.2, 0.6, 0.4])
    sweeps = []
    for _ in range(30):
        e = rng.normal(size=3)
        sweeps.append(_fake(e, layer_means + 0.1 * e))
    out = localisation_correlation(sweeps, n_boot=200)
    assert out["within_layer_pearson"]["value"] == pytest.approx(1.0, abs=1e-9)
    assert out["r2_layer_and_effect"]["value"] == pytest.approx(1.0, abs=1e-9)
    assert out["r2_layer"]["value"] < out["r2_layer_and_effect"]["value"]
    lo, hi = out["within_layer_pearson"]["ci"]
    assert lo <= 1.0 + 1e-9 and hi == pytest.approx(1.0)
    # the score ignores the trace: the within-layer correlation is about 0 and its interval covers 0
    sweeps = [_fake(rng.normal(size=3), layer_means + 0.1 * rng.normal(size=3)) for _ in range(60)]
    out = localisation_correlation(sweeps, n_boot=300)
    assert out["within_layer_pearson"]["ci"][0] < 0 < out["within_layer_pearson"]["ci"][1]
    with pytest.raises(HyperParameterError):
        localisation_correlation(sweeps[:2])


def test_cli_layer_sweep(tiny_model_dir, tmp_path, capsys):
    from tracer.cli import main

    out = tmp_path / "sweep.json"
    args = ["layer-sweep", "--model", str(tiny_model_dir), "--subject", "The tower", "--prompt", "{} is located in",
            "--target", " Rome", "--true-target", " Paris", "--neighbour", "The museum is located in",
            "--layers", "1-2", "--samples", "2", "--steps", "3", "--no-stats", "--json", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    saved = LayerSweep.from_dict(json.loads(out.read_text()))
    assert saved.layers == (1, 2) and saved.settings["statistics"] == "identity"
    assert f"| 1 | {saved.effect[1]:.3f} |" in text or f"| 1 | **{saved.effect[1]:.3f}** |" in text
    assert main(["layer-sweep", "--subject", "x", "--prompt", "{} y", "--layers", "0-2"]) == 2  # before any model loads
    assert "--target" in capsys.readouterr().err
    assert main(["layer-sweep", "--subject", "x", "--prompt", "{} y", "--target", "z", "--layers", "two"]) == 2


@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_sweep_writes_the_fact_where_the_defaults_do(embedded):
    case = Case(case_id=0, dataset="counterfact", subject="The Eiffel Tower", prompt="{} is located in the city of",
                target_new="Rome", target_true="Paris",
                paraphrase_prompts=("The Eiffel Tower, the famous landmark, stands in the city of",),
                neighborhood_prompts=("The Louvre is located in the city of",), specificity_targets=("Paris",))
    sweep = layer_sweep(embedded, case, [4, 20], samples=3, progress=False)
    at4, at20 = sweep.scores
    assert sweep.before["rewrite_success"] == 0.0
    assert at4["rewrite_success"] == 1.0 and at4["rewrite_score"] > 0.5  # ROME's default layer writes it
    assert at4["rewrite_score"] > at20["rewrite_score"]
    assert max(sweep.effect[:8]) > max(sweep.effect[16:])  # the trace's MLP effect sits early, as ROME's


def test_sweep_figure_data_and_literal_text():
    from test_text import HOSTILE, math_exposures

    from widgets.sweep_figures import layer_sweep_figure

    sweep = LayerSweep(case={"prompt": "{} is in", "subject": HOSTILE, "target_new": HOSTILE}, model=HOSTILE,
                       layers=(0, 2), effect=(0.1, 0.0, 0.4, 0.2),
                       before={}, scores=({"rewrite_score": 0.2, "paraphrase_score": 0.1, "neighborhood_success": 1.0},
                                          {"rewrite_score": 0.9, "paraphrase_score": 0.5, "neighborhood_success": 0.5}),
                       settings={}, seconds={})
    fig = layer_sweep_figure(sweep)
    data = fig.select_one({"name": "layer-sweep"}).data
    assert data["layer"] == [0, 2] and data["effect"] == [0.25, 1.0] and data["rewrite_score"] == [0.2, 0.9]
    assert all(math.isnan(x) for x in data["rewrite_gen_success"])
    assert math_exposures(fig) == [] and HOSTILE in fig.title.text.text
