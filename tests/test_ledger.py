"""Ledger: exact apply/revert in any order, files round-trip onto a fresh model, failures touch nothing."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import make_tiny_model

from tracer.edit import EditRequest, Ledger, ROMEHyperParams, edited, rome_edit
from tracer.edit.ledger import EditRecord, load_records
from tracer.errors import EditError, HyperParameterError

SMALL = ((5, 2),)
REQUESTS = [EditRequest("{} is located in the city of", "The Eiffel Tower", " Rome"),
            EditRequest("{} plays the", "Miles Davis", " guitar"),
            EditRequest("{} was founded in", "The Roman Empire", " Paris")]


def _hp(lm, **kw):
    return ROMEHyperParams.for_model(lm, context_template_lengths=SMALL, v_num_grad_steps=3, **kw)


def _state(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def _same(lm, state):
    return all(torch.equal(state[k], v) for k, v in lm.model.state_dict().items())


@pytest.fixture(scope="module")
def computed():
    """Records per family, computed once per module (tiny models are deterministic per seed)."""
    return {}


@pytest.fixture
def records(tiny_lm, computed):
    """Three edits computed independently on the unedited model (two at one layer, one below it)."""
    family = tiny_lm.layers.family
    if family not in computed:
        hp = _hp(tiny_lm)
        recs = [rome_edit(tiny_lm, r, hp, stats="identity", progress=False) for r in REQUESTS[:2]]
        recs.append(rome_edit(tiny_lm, REQUESTS[2], _hp(tiny_lm, layer=max(0, hp.layer - 1)), stats="identity",
                              progress=False))
        computed[family] = recs
    return computed[family]


def test_apply_revert_bit_exact_in_any_order(tiny_lm, records):
    lm = tiny_lm
    original = _state(lm)
    a, b, c = records
    ledger = Ledger(lm)
    ledger.apply(a)
    only_a = _state(lm)
    assert not _same(lm, original)
    ledger.apply(b, verify=True)
    ledger.apply(c, verify=False)  # c was computed before a or b moved its layer's inputs
    abc = _state(lm)
    ledger.revert(b)
    ledger.revert(c)
    assert _same(lm, only_a)
    ledger.revert(a)
    assert _same(lm, original) and ledger.records == ()
    # another order gives the same bits
    ledger.apply(c, verify=False)
    ledger.apply(b, verify=False)
    ledger.apply(a, verify=False)
    assert _same(lm, abc)
    ledger.revert(a)
    ledger.revert_all()
    assert _same(lm, original)


def test_ledger_file_round_trips_onto_a_fresh_model(tiny_lm, records, tmp_path):
    lm = tiny_lm
    a, b, _ = records
    with Ledger(lm) as ledger:
        ledger.apply(a)
        ledger.apply(b)
        edited_state = _state(lm)
        path = ledger.save(tmp_path / "edits.safetensors")
    loaded = Ledger.load(path)
    assert [r.id for r in loaded] == [a.id, b.id]
    assert loaded[0].to_dict() == a.to_dict()
    assert torch.equal(loaded[1].u, b.u) and torch.equal(loaded[1].v, b.v)
    fresh = make_tiny_model(lm.layers.family)
    Ledger(fresh).apply_all(loaded)
    assert _same(fresh, edited_state)


def test_record_json_round_trip(records):
    record = records[0]
    d = json.loads(json.dumps(record.to_dict(tensors=True)))
    back = EditRecord.from_dict(d)
    assert back.id == record.id and back.to_dict() == record.to_dict()
    d["v"][0] += 1.0
    with pytest.raises(EditError, match="does not verify"):
        EditRecord.from_dict(d)


def test_failing_edits_leave_weights_unchanged(tiny_lm, records):
    lm = tiny_lm
    original = _state(lm)
    a = records[0]
    ledger = Ledger(lm)
    with pytest.raises(EditError, match="factors"):
        ledger.apply(replace(a, u=a.u[:-1]))
    with pytest.raises(EditError, match="non-finite"):
        ledger.apply(replace(a, v=a.v.clone().fill_(float("nan"))))
    with pytest.raises(EditError, match="overflow|non-finite"):
        ledger.apply(replace(a, v=a.v * 1e300, u=a.u * 1e300))
    with pytest.raises(EditError, match="other weights"):
        ledger.apply(replace(a, fingerprint="0" * 16))
    assert _same(lm, original) and ledger.records == ()
    # a sequence whose second item fails restores the first edit's change
    with pytest.raises(HyperParameterError):
        with edited(lm, [a, REQUESTS[1]], hparams=ROMEHyperParams(layer=lm.n_layers), stats="identity"):
            pass
    assert _same(lm, original)
    with pytest.raises(EditError):
        with edited(lm, [a, replace(a, u=a.u[:-1])]):
            pass
    assert _same(lm, original)


def test_bad_request_in_edited_sequence(tiny_lm):
    lm = tiny_lm
    original = _state(lm)
    with pytest.raises(EditError, match="EditRequest"):
        with edited(lm, [REQUESTS[0], {"prompt": "{} is in", "subject": "X", "target_new": " Rome"}],
                    hparams=_hp(lm), stats="identity", progress=False):
            pass
    assert _same(lm, original)


def test_edited_restores_on_exception(tiny_lm, records):
    lm = tiny_lm
    original = _state(lm)
    with pytest.raises(RuntimeError, match="boom"):
        with edited(lm, records[:2]) as recs:
            assert [r.id for r in recs] == [records[0].id, records[1].id]
            assert not _same(lm, original)
            raise RuntimeError("boom")
    assert _same(lm, original)


def test_ledger_guards(tiny_lm, records, tmp_path):
    lm = tiny_lm
    a = records[0]
    ledger = Ledger(lm)
    ledger.apply(a)
    with pytest.raises(EditError, match="already applied"):
        ledger.apply(a)
    with pytest.raises(EditError, match="not applied"):
        ledger.revert(records[1])
    with torch.no_grad():
        lm.model.get_submodule(a.module).weight.add_(1.0)
    with pytest.raises(EditError, match="outside this ledger"):
        ledger.revert(a)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a ledger")
    with pytest.raises(EditError, match="not a factscope ledger"):
        load_records(bad)
    with pytest.raises(EditError, match="does not exist"):
        load_records(tmp_path / "missing.safetensors")


def test_export_merged_model(records, tmp_path):
    from transformers import AutoModelForCausalLM

    lm = make_tiny_model("gpt2")
    hp = _hp(lm)
    record = rome_edit(lm, REQUESTS[0], hp, stats="identity", progress=False)
    with Ledger(lm) as ledger:
        ledger.apply(record)
        state = _state(lm)
        out = ledger.export(tmp_path / "edited")
        with pytest.raises(EditError, match="not an empty directory"):
            ledger.export(tmp_path / "edited")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert json.loads((out / "factscope-edits.json").read_text())[0]["id"] == record.id


# ---------------------------------------------------------------------------- MEMIT batches in the ledger


@pytest.fixture(scope="module")
def mixed():
    """A tiny Llama, two ROME edits and one MEMIT batch, all computed on the unedited model."""
    from tracer.edit.memit import MemitHyperParams, Request, compute_memit

    lm = make_tiny_model("llama")
    hp = _hp(lm)
    romes = [rome_edit(lm, r, hp, stats="identity", progress=False) for r in REQUESTS[:2]]
    before = _state(lm)
    batch = compute_memit(lm, [Request("Paris", "{} is the capital of", "Germany"),
                               Request("Rome", "The city of {} is in", "Spain")],
                          MemitHyperParams(layers=(hp.layer - 1, hp.layer), v_steps=3), stats="identity",
                          templates=("{}", "Hello. {}"), progress=False, apply=False)
    assert _same(lm, before)  # apply=False leaves the model as it was
    return lm, romes, batch


def test_memit_batch_and_rome_edits_revert_in_any_order(mixed, tmp_path):
    lm, (a, b), batch = mixed
    original = _state(lm)
    assert batch.modules[-1] == a.module  # both methods write the same matrix
    alone = Ledger(lm)
    alone.apply(batch)
    only_batch = _state(lm)
    assert not _same(lm, original)
    alone.revert(batch)
    assert _same(lm, original)
    ledger = Ledger(lm)
    ledger.apply(a)
    ledger.apply(batch)  # a edits the batch's top matrix itself, which the keys there do not depend on
    with pytest.raises(EditError, match="other weights"):
        ledger.apply(b)  # b was computed before the batch changed the layer below b's
    ledger.apply(b, verify=False)
    everything = _state(lm)
    ledger.revert(a)
    ledger.revert(b)
    assert _same(lm, only_batch)  # the batch's bits do not depend on what came and went
    ledger.apply(b, verify=False)
    ledger.apply(a, verify=False)
    assert _same(lm, everything)
    path = ledger.save(tmp_path / "mixed.safetensors")
    ledger.revert(batch)
    ledger.revert_all()
    assert _same(lm, original)
    loaded = Ledger.load(path)
    assert [(type(r).__name__, r.id) for r in loaded] == [("MemitRecord", batch.id), ("EditRecord", b.id), ("EditRecord", a.id)]
    assert loaded[0].requests == batch.requests and not loaded[0].applied
    fresh = make_tiny_model("llama")
    Ledger(fresh).apply_all(loaded, verify=False)
    assert _same(fresh, everything)
    with edited(lm, [batch]):
        assert _same(lm, only_batch)
    assert _same(lm, original)


def test_memit_batch_guards(mixed, tmp_path):
    from tracer.edit.memit import MemitRecord

    lm, (a, _), batch = mixed
    original = _state(lm)
    ledger = Ledger(lm)
    with pytest.raises(EditError, match="other weights"):  # keys of the upper layer moved
        w = lm.model.get_submodule(lm.layers.mlp_out_name(batch.layers[0])).weight
        kept = w.detach().clone()
        with torch.no_grad():
            w.add_(0.5)
        try:
            ledger.apply(batch)
        finally:
            with torch.no_grad():
                w.copy_(kept)
    assert _same(lm, original)
    batch.apply(lm)  # applied directly, outside any ledger
    try:
        with pytest.raises(EditError, match="already applied outside a ledger"):
            ledger.apply(batch)
    finally:
        batch.revert(lm)
    assert _same(lm, original)
    bad = MemitRecord(**{**{f: getattr(batch, f) for f in ("requests", "hparams", "modules", "templates", "stats",
                                                              "z_losses", "timings")},
                         "deltas": [batch.deltas[0], batch.deltas[1].clone().fill_(float("nan"))]})
    ledger.apply(a)
    with pytest.raises(EditError, match="non-finite"):
        ledger.apply(bad, verify=False)
    assert ledger.records == (a,)  # nothing of the bad batch was written, a is still in place
    ledger.revert(a)
    assert _same(lm, original)
    path = ledger.save(tmp_path / "empty.safetensors")
    assert Ledger.load(path) == []
    d = batch.to_dict()
    with pytest.raises(EditError, match="does not verify"):
        MemitRecord.from_dict(d, [batch.deltas[0] * 2, batch.deltas[1]])


def test_format_1_ledger_files_still_load(tiny_lm, records, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    a = records[0]
    ledger = Ledger(tiny_lm)
    ledger.apply(a)
    new = ledger.save(tmp_path / "v2.safetensors")
    ledger.revert_all()
    with safe_open(str(new), framework="pt") as f:
        meta = json.loads(f.metadata()["factscope_ledger"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["format"] == 2
    meta["format"] = 1  # what the first release wrote for ROME edits: the same layout
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata={"factscope_ledger": json.dumps(meta)})
    assert [r.id for r in load_records(tmp_path / "v1.safetensors")] == [a.id]
    meta["format"] = 3
    save_file(tensors, str(tmp_path / "v3.safetensors"), metadata={"factscope_ledger": json.dumps(meta)})
    with pytest.raises(EditError, match="format 3"):
        load_records(tmp_path / "v3.safetensors")
