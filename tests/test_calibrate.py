"""Calibration (tracer.edit.calibrate, factscope calibrate): settings derived from the model itself,
written to a settings file that the defaults (and so edit, evaluate and the panels) pick up."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_tiny_model
from tracer.edit import FTLHyperParams, MemitHyperParams, ROMEHyperParams, defaults_for
from tracer.edit.calibrate import (Calibration, calibrate, epsilon_for, lambda_for, last_subject_effects, layer_evidence,
                                   memit_range)
from tracer.edit.defaults import ModelIdentity, calibration_path, read_settings
from tracer.errors import HyperParameterError
from tracer.generation import greedy
from tracer.knowns import load_facts
from tracer.layers import get_module
from tracer.stats import StatsCache


def test_lambda_for_solves_the_write_fraction():
    # one eigenvalue g: g / (λ + g) = 2/3  <=>  λ = g / 2
    assert lambda_for(torch.tensor([10.0, 10.0])) == pytest.approx(5.0, rel=1e-9)
    eig = torch.tensor([1.0, 30.0, 400.0])
    lam = lambda_for(eig, write=0.5)
    assert float((eig / (lam + eig)).mean()) == pytest.approx(0.5, abs=1e-9)
    with pytest.raises(HyperParameterError):
        lambda_for(eig, write=1.0)


def test_memit_range_is_the_plateau_and_one_more():
    mean = [0.77, 0.59, 0.80, 0.92, 0.96, 0.89, 0.57, 0.43, 0.43, 0.52]  # the embedded model's table (docs/defaults.md)
    assert memit_range(mean, 4) == (2, 3, 4, 5, 6)
    assert memit_range([0.1, 1.0, 0.1, 0.1], 1) == (1, 2)
    assert memit_range([0.1, 0.2, 0.9, 1.0], 3) == (2, 3)  # no layer above the last: the plateau alone


def test_layer_evidence_bootstrap():
    effects = np.array([[0.0, 0.1, 0.5, 0.2], [0.1, 0.2, 0.6, 0.1], [0.0, 0.3, 0.4, 0.1]])
    ev = layer_evidence(effects, n_boot=200, seed=1)
    assert ev["peak"] == 2 and ev["peak_share"][2] == 1.0 and ev["peak_interval"] == [2, 2]
    assert np.allclose(ev["mean"], effects.mean(0))
    assert all(lo <= m <= hi for lo, m, hi in zip(ev["ci_low"], ev["mean"], ev["ci_high"]))


def test_epsilon_is_output_scale_over_key_l1():
    lm = make_tiny_model("llama")
    eps = epsilon_for(lm, 1, corpus_tokens=300, chunk=64)
    assert eps["tokens"] == 300
    # the same ratio from one direct forward pass over the same first chunks
    name = lm.layers.mlp_out_name(1)
    from tracer.hooks import hooked
    from tracer.stats import Corpus

    keys = []
    text = next(Corpus.from_source(None).texts())
    ids = lm.tokenizer(text, add_special_tokens=True)["input_ids"]
    with torch.no_grad():
        for s in range(0, 320, 64):
            with hooked(lm.model, inputs={name: lambda x: keys.append(x[0, 1:])}):
                lm.model(input_ids=torch.tensor([ids[s:s + 64]]))
    k = torch.cat(keys)[:300]
    w = get_module(lm.model, name).weight
    assert eps["rms_output"] == pytest.approx(float((k @ w.T).pow(2).mean().sqrt()), rel=1e-5)
    assert eps["epsilon"] == pytest.approx(eps["rms_output"] / float(k.abs().sum(1).mean()), rel=1e-5)


def _facts_the_model_knows(lm, shared_data, tmp_path, n=12):
    """known_1000 prompts with the tiny model's own greedy word as the attribute (so it "knows" them)."""
    facts = load_facts(shared_data / "known_1000.json")[:80]
    answers = greedy(lm, [f["prompt"] for f in facts], 1)
    kept = [{**f, "attribute": a.strip()} for f, a in zip(facts, answers) if a.strip().isalpha()]
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(kept))
    return path


def test_calibrate_writes_settings_the_defaults_use(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache"))
    lm = make_tiny_model("llama", n_layers=6)
    facts = _facts_the_model_knows(lm, shared_data, tmp_path)
    before = defaults_for(lm)
    assert before.source.startswith("no measured model")
    cal = calibrate(lm, n_facts=6, samples=3, batch=6, stats=StatsCache(tmp_path / "stats"), stats_tokens=1000,
                    facts_path=facts, corpus_tokens=256, n_boot=100, progress=False)
    effects = np.array(cal.measurements["effects"])
    assert effects.shape == (6, 6) and cal.rome["layer"] == int(effects.mean(0).argmax())
    # the first fact's row is its trace, recomputed
    first = cal.measurements["facts"][0]
    subject = next(f["subject"] for f in load_facts(facts) if f["prompt"] == first)
    row, _ = last_subject_effects(lm, first, subject, samples=3, window=10, seed=1)
    np.testing.assert_allclose(effects[0], row)
    assert cal.memit["layers"] == memit_range(effects.mean(0).tolist(), cal.rome["layer"])
    lams = [v["lambda"] for v in cal.measurements["lambda"].values()]
    assert cal.memit["mom2_weight"] == float(f"{np.median(lams):.2g}")
    for v in cal.measurements["lambda"].values():  # each layer's λ writes the batch to 2/3 on average
        g = torch.tensor(v["eigenvalues"], dtype=torch.float64)
        assert float((g / (v["lambda"] + g)).mean()) == pytest.approx(2 / 3, abs=1e-6)
    assert cal.ftl["norm_constraint"] == cal.ftl["lr"] == float(f"{cal.measurements['epsilon']['epsilon']:.2g}") > 0

    path = cal.save()
    assert path == calibration_path(ModelIdentity.of(lm))
    assert Calibration.load(path).to_dict() == cal.to_dict()
    after = defaults_for(lm)
    assert after.source.startswith("calibrated from the model itself") and str(path) in after.source
    assert ROMEHyperParams.for_model(lm).layer == cal.rome["layer"]
    assert MemitHyperParams.for_model(lm).layers == cal.memit["layers"]
    assert MemitHyperParams.for_model(lm).mom2_weight == cal.memit["mom2_weight"]
    assert FTLHyperParams.for_model(lm) == FTLHyperParams(layer=cal.rome["layer"], lr=cal.ftl["lr"],
                                                          norm_constraint=cal.ftl["norm_constraint"])
    assert after.evidence["memit.mom2_weight"].startswith("λ at which a batch of 6")


def test_settings_file_is_checked(tmp_path, embedded_identity=None):
    lm = make_tiny_model("gpt2")
    identity = ModelIdentity.of(lm)
    good = {"format": 1, "identity": identity.to_dict(), "rome": {"layer": 1}, "memit": {"layers": [1, 2], "mom2_weight": 10.0},
            "ftl": {"lr": 0.01, "norm_constraint": 0.01}}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(good))
    assert read_settings(path, identity)["rome"]["layer"] == 1
    d = defaults_for(lm, settings=path)
    assert d.rome["layer"] == 1 and d.memit["layers"] == (1, 2) and d.ftl == {"lr": 0.01, "norm_constraint": 0.01, "layer": 1}
    for change, message in [({"format": 2}, "format"), ({"rome": {"layer": 9}}, "rome.layer"),
                            ({"memit": {"layers": [2, 1], "mom2_weight": 1.0}}, "memit.layers"),
                            ({"ftl": {"lr": -1, "norm_constraint": 0.01}}, "ftl.lr"),
                            ({"identity": {**identity.to_dict(), "n_layers": 7}}, "another model")]:
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(HyperParameterError, match=message):
            defaults_for(lm, settings=path)
    path.write_text("{not json")
    with pytest.raises(HyperParameterError, match="not readable JSON"):
        read_settings(path)


@pytest.mark.embedded
def test_measured_settings_win_over_a_cached_calibration(embedded, tmp_path, monkeypatch):
    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path))
    identity = ModelIdentity.of(embedded)
    path = calibration_path(identity)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"format": 1, "identity": identity.to_dict(), "rome": {"layer": 7},
                                "memit": {"layers": [6, 7], "mom2_weight": 99.0}, "ftl": {"lr": 0.5, "norm_constraint": 0.5}}))
    d = defaults_for(embedded)
    assert d.rome["layer"] == 4 and "is not used" in d.source
    assert defaults_for(embedded, settings=path).rome["layer"] == 7


def test_cli_calibrate_tiny_model_dir(tiny_model_dir, tmp_path, shared_data, capsys, monkeypatch):
    from tracer.cli import main
    from tracer.models import load_model

    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache"))
    lm = load_model(str(tiny_model_dir))
    facts = _facts_the_model_knows(lm, shared_data, tmp_path)
    out = tmp_path / "settings.json"
    assert main(["calibrate", "--model", str(tiny_model_dir), "--facts", str(facts), "--n-facts", "4", "--samples", "2",
                 "--batch", "4", "--stats", "identity", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ROME  layer" in text and "evidence for memit.mom2_weight" in text and f"settings -> {out}" in text
    saved = read_settings(out, ModelIdentity.of(lm))
    assert saved["memit"]["mom2_weight"] > 0 and saved["seconds"]["traces"] > 0
    assert main(["calibrate", "--model", str(tiny_model_dir), "--n-facts", "1", "--out", str(out)]) == 2
    assert "n_facts must be an integer >= 2" in capsys.readouterr().err
