"""Defaults follow the model's identity (architecture and dimensions), never its name."""
from __future__ import annotations

import json

import pytest

from conftest import make_tiny_model
from tracer.cli import main
from tracer.edit import FTLHyperParams, MemitHyperParams, ModelIdentity, ROMEHyperParams, defaults_for
from tracer.edit.defaults import BASE_FTL, MEASURED, SCALED_MEMIT
from tracer.models import load_model


def _all(lm) -> tuple:
    return ROMEHyperParams.for_model(lm), MemitHyperParams.for_model(lm), FTLHyperParams.for_model(lm)


def test_a_name_does_not_pick_defaults():
    tiny = make_tiny_model("llama")
    before = _all(tiny)
    tiny.name = "smollm2-135m"  # the embedded model's alias on other weights: nothing changes
    assert _all(tiny) == before
    rome, memit, ftl = before
    assert (ftl.lr, ftl.norm_constraint) == (BASE_FTL["lr"], BASE_FTL["norm_constraint"])
    assert memit.mom2_weight == SCALED_MEMIT["mom2_weight"] and ftl.layer == rome.layer
    choice = defaults_for(tiny)
    assert "no measured model" in choice.source and choice.evidence == {}


def test_scaled_rule_per_family_and_depth():
    for family in ("gpt2", "gpt_neox", "llama", "gptj"):
        lm = make_tiny_model(family)
        n = lm.n_layers
        d = defaults_for(lm)
        assert 0 <= d.rome["layer"] < n and list(d.memit["layers"]) == sorted(set(d.memit["layers"]))
        assert d.memit["layers"][-1] < n and d.identity == ModelIdentity.of(lm)
        assert type(d).from_dict(d.to_dict()) == d


def test_measured_rows_are_matched_on_every_given_field():
    smol = MEASURED[0]
    same = ModelIdentity(**smol.match)
    assert smol.matches(same)
    wider = ModelIdentity(**{**smol.match, "hidden_size": 577})
    assert not any(m.matches(wider) for m in MEASURED)


def test_defaults_command_shows_what_applies_and_why(tiny_model_dir, capsys):
    assert main(["defaults", "--model", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "no measured model has this identity" in out and "ROME  layer" in out and "gpt2, 4 layers" in out
    assert main(["defaults", "--model", str(tiny_model_dir), "--json"]) == 0

    d = json.loads(capsys.readouterr().out)
    assert d["identity"]["family"] == "gpt2" and d["rome"]["layer"] == ROMEHyperParams.for_model(
        load_model(str(tiny_model_dir))).layer


@pytest.mark.embedded
def test_embedded_model_gets_its_measured_defaults_however_it_is_loaded(embedded):
    """By alias, by its .gguf file and from a local directory of the same weights: one identity, the
    measured SmolLM2 defaults (layer 4; MEMIT 2-6 with λ 1,500; FT-L ε 1e-2), whatever the name."""
    from tracer.models import _cached_gguf_dir, embedded_gguf_files, load_model

    [gguf] = embedded_gguf_files("smollm2-135m")
    by_path = load_model(str(gguf))
    from_dir = load_model(str(_cached_gguf_dir(gguf)))
    assert len({embedded.name, by_path.name, from_dir.name}) == 3
    expected = _all(embedded)
    assert _all(by_path) == expected and _all(from_dir) == expected
    rome, memit, ftl = expected
    assert rome.layer == 4 and memit.layers == (2, 3, 4, 5, 6) and memit.mom2_weight == 1500.0
    assert (ftl.layer, ftl.lr, ftl.norm_constraint) == (4, 1e-2, 1e-2)
    assert defaults_for(from_dir).source.startswith("measured on SmolLM2-135M")
