"""Ledger: exact apply/revert in any order, files round-trip onto a fresh model, failures touch nothing."""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model

from tracer.edit import EditRequest, Ledger, ROMEHyperParams, edited, rome_edit
from tracer.edit import EditRecord, WeightBook, load_records, save_records
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
    with pytest.raises(EditError, match=r"ΔW of shape .* which needs"):
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
    with pytest.raises(EditError, match="was changed outside"):
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
    from tracer.edit import MemitHyperParams, Request, compute_memit

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
    from tracer.edit import MemitRecord

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
        with pytest.raises(EditError, match="already applied to this model .outside this ledger"):
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


LEGACY = Path(__file__).parent / "data" / "legacy-edits"  # written by the code before ids covered every field
LEGACY_IDS = {"rome": "3c7c543b7bc6199e", "memit": "9b6427dd0f4ad27f"}


def _read(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["factscope_ledger"]), {k: f.get_tensor(k) for k in f.keys()}


def _write(path, meta, tensors):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"factscope_ledger": json.dumps(meta)})
    return path


def test_format_1_and_2_ledger_files_still_load(tmp_path):
    """Files of the earlier formats load, verified by their own id rule, and apply onto a fresh model;
    saved again they become format 3, and an old file whose factors were changed still fails."""
    fresh = make_tiny_model("llama")
    original = _state(fresh)
    v2 = load_records(LEGACY / "ledger-format2.safetensors")
    assert [(type(r).__name__, r.legacy_id) for r in v2] == [("EditRecord", LEGACY_IDS["rome"]),
                                                             ("MemitRecord", LEGACY_IDS["memit"])]
    v1 = load_records(LEGACY / "ledger-format1-rome.safetensors")
    assert [r.legacy_id for r in v1] == [LEGACY_IDS["rome"]] and v1[0].to_dict() == v2[0].to_dict()
    with Ledger(fresh) as ledger:
        ledger.apply_all(v2, verify=False)
        edited_state = _state(fresh)
        assert not _same(fresh, original)
        path = ledger.save(tmp_path / "v3.safetensors")
    assert _same(fresh, original)
    meta, tensors = _read(path)
    assert meta["format"] == 3 and [d["id"] for d in meta["records"]] == [r.id for r in v2]
    assert all(r.id != r.legacy_id for r in v2)
    again = load_records(path)
    with Ledger(fresh) as ledger:
        ledger.apply_all(again, verify=False)
        assert _same(fresh, edited_state)
    old_meta, old_tensors = _read(LEGACY / "ledger-format2.safetensors")
    old_tensors["0.u"] = old_tensors["0.u"] * 2
    with pytest.raises(EditError, match="does not verify"):
        load_records(_write(tmp_path / "bad-v2.safetensors", old_meta, old_tensors))
    meta["format"] = 4
    with pytest.raises(EditError, match="format 4"):
        load_records(_write(tmp_path / "v4.safetensors", meta, tensors))
    old_meta["format"] = 3  # old records (old ids) under a new header: verified by the new rule, refused
    with pytest.raises(EditError):
        load_records(_write(tmp_path / "relabelled.safetensors", old_meta, _read(LEGACY / "ledger-format2.safetensors")[1]))


def _one_line_error(path, match=None):
    with pytest.raises(EditError) as info:
        load_records(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    if match:
        assert re.search(match, message), message
    return message


def _tampered(mixed, tmp_path):
    """A saved ledger with a ROME edit (record 0) and a MEMIT batch (record 1): its metadata and tensors."""
    lm, (a, _), batch = mixed
    path = save_records([a, batch], tmp_path / "good.safetensors")
    assert [r.id for r in load_records(path)] == [a.id, batch.id]
    return _read(path)


ROME_TAMPERING = {
    "layer": lambda d: d.update(layer=d["layer"] + 1),
    "fingerprint": lambda d: d.update(fingerprint="0" * 16),
    "module": lambda d: d.update(module=d["module"].replace(str(d["layer"]), str(d["layer"] + 1))),
    "model": lambda d: d.update(model="gpt2-xl"),
    "family": lambda d: d.update(family="gptj"),
    "target_true": lambda d: d.update(target_true=" Paris!"),
    "hparams": lambda d: d["hparams"].update(v_lr=d["hparams"]["v_lr"] * 2),
    "request": lambda d: d["request"].update(target_new=" Berlin"),
    "statistics": lambda d: d["statistics"].update(n_tokens=123),
    "context_templates": lambda d: d["context_templates"].append("Hi. {}"),
    "loss": lambda d: d["loss"].append(0.5),
    "loss_terms": lambda d: d["loss_terms"].pop("kl"),
    "before": lambda d: d["before"].update(p_new=0.99),
    "after": lambda d: d["after"].update(p_new=0.01),
    "seconds": lambda d: d["seconds"].update(total=1e-3),
    "norms": lambda d: d["norms"].update(u=2.0),
    "method": lambda d: d.update(method="ROME2"),
    "extra field": lambda d: d.update(comment="hi"),
}
MEMIT_TAMPERING = {
    "hparams": lambda d: d["hparams"].update(mom2_weight=d["hparams"]["mom2_weight"] * 2),
    "modules": lambda d: d["modules"].reverse(),
    "requests": lambda d: d["requests"][0].update(target_new="France"),
    "templates": lambda d: d["templates"].append("Hi. {}"),
    "stats": lambda d: d["stats"][0].update(kind="given"),
    "z_losses": lambda d: d["z_losses"][0].append(0.1),
    "timings": lambda d: d["timings"].update(z_s=0.0),
    "fingerprints": lambda d: d["fingerprints"].update({k: "0" * 16 for k in d["fingerprints"]}),
}
TENSOR_TAMPERING = {"0.u": 0, "0.v": 0, "0.k_star": 0, "0.v_star": 0, "1.delta.0": 1, "1.delta.1": 1}


def test_tampering_with_any_field_of_a_saved_ledger_is_refused(mixed, tmp_path):
    """The id covers every field and tensor: each edit below makes the file fail with a one-line error."""
    from copy import deepcopy

    meta, tensors = _tampered(mixed, tmp_path)
    loaded = []
    for index, table in ((0, ROME_TAMPERING), (1, MEMIT_TAMPERING)):
        for field_name, tamper in table.items():
            m = deepcopy(meta)
            tamper(m["records"][index])
            path = _write(tmp_path / f"t-{index}-{field_name}.safetensors", m, tensors)
            try:
                message = _one_line_error(path)
            except BaseException as e:  # noqa: BLE001 - collected, reported below
                loaded.append(f"{index}.{field_name}: {type(e).__name__}")
            else:
                assert f"record {index}" in message, message
    for name in TENSOR_TAMPERING:
        t = dict(tensors)
        t[name] = t[name].clone()
        t[name].view(-1)[0] += 0.25
        try:
            _one_line_error(_write(tmp_path / f"t-{name}.safetensors", meta, t), "does not verify")
        except BaseException as e:  # noqa: BLE001
            loaded.append(f"{name}: {type(e).__name__}")
    assert loaded == []


MALFORMED = {
    "missing records": (lambda m, t: m.pop("records"), "lacks field 'records'"),
    "records not a list": (lambda m, t: m.update(records={"0": 1}), "'records' must be"),
    "record not an object": (lambda m, t: m["records"].__setitem__(0, [1, 2]), "'records' must be"),
    "missing id": (lambda m, t: m["records"][0].pop("id"), "record 0 lacks field 'id'"),
    "missing layer": (lambda m, t: m["records"][0].pop("layer"), "record 0 lacks field 'layer'"),
    "layer a string": (lambda m, t: m["records"][0].update(layer="2"), "'layer' must be an integer"),
    "layer a bool": (lambda m, t: m["records"][0].update(layer=True), "'layer' must be an integer"),
    "loss of strings": (lambda m, t: m["records"][0].update(loss=["x"]), "'loss' must be"),
    "request a list": (lambda m, t: m["records"][0].update(request=[1]), "'request' must be"),
    "request missing subject": (lambda m, t: m["records"][0]["request"].pop("subject"), "'request'"),
    "hparams of wrong types": (lambda m, t: m["records"][0]["hparams"].update(layer="x"), "'hparams'"),
    "hparams unknown key": (lambda m, t: m["records"][0]["hparams"].update(bogus=1), "'hparams'"),
    "templates not strings": (lambda m, t: m["records"][0].update(context_templates=[1]), "'context_templates'"),
    "missing tensor": (lambda m, t: t.pop("0.k_star"), "lacks tensor '0.k_star'"),
    "extra tensor": (lambda m, t: t.update({"7.u": torch.zeros(3)}), "holds tensor '7.u'"),
    "u two-dimensional": (lambda m, t: t.update({"0.u": t["0.u"][None]}), "tensor 'u' must be"),
    "k_star of another shape": (lambda m, t: t.update({"0.k_star": t["0.k_star"][:-1]}), "tensor 'k_star' has shape"),
    "k_star NaN": (lambda m, t: t["0.k_star"].__setitem__(0, float("nan")), "'k_star' has non-finite"),
    "integer u": (lambda m, t: t.update({"0.u": t["0.u"].long()}), "floating"),
    "MEMIT modules not a list": (lambda m, t: m["records"][1].update(modules="x"), "'modules' must be"),
    "MEMIT delta NaN": (lambda m, t: t["1.delta.1"].view(-1).__setitem__(0, float("nan")), "non-finite"),
    "MEMIT delta one-dimensional": (lambda m, t: t.update({"1.delta.0": t["1.delta.0"][0]}), "'delta.0' must be"),
    "MEMIT missing z_losses": (lambda m, t: m["records"][1].pop("z_losses"), "lacks field 'z_losses'"),
    "MEMIT timings not numbers": (lambda m, t: m["records"][1]["timings"].update(z_s="fast"), "'timings'"),
    "MEMIT hparams layers bad": (lambda m, t: m["records"][1]["hparams"].update(layers=["a"]), "hparams"),
    "MEMIT requests malformed": (lambda m, t: m["records"][1].update(requests=[{"subject": 1}]), "'requests'"),
    "MEMIT fingerprint keys": (lambda m, t: m["records"][1].update(fingerprints={"x": "y"}), "'fingerprints'"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_ledger_fields_are_one_line_errors(mixed, tmp_path, case):
    from copy import deepcopy

    meta, tensors = _tampered(mixed, tmp_path)
    meta = deepcopy(meta)
    tensors = {k: v.clone() for k, v in tensors.items()}
    change, match = MALFORMED[case]
    change(meta, tensors)
    _one_line_error(_write(tmp_path / "bad.safetensors", meta, tensors), match)


def test_malformed_ledger_files_are_one_line_errors(mixed, tmp_path):
    from safetensors.torch import save_file

    meta, tensors = _tampered(mixed, tmp_path)
    good = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    _one_line_error(tmp_path / "truncated.safetensors", "not a factscope ledger")
    (tmp_path / "text.safetensors").write_text("hello")
    _one_line_error(tmp_path / "text.safetensors", "not a factscope ledger")
    save_file(tensors, str(tmp_path / "no-meta.safetensors"))
    _one_line_error(tmp_path / "no-meta.safetensors", "not a factscope ledger")
    save_file(tensors, str(tmp_path / "not-json.safetensors"), metadata={"factscope_ledger": "{"})
    _one_line_error(tmp_path / "not-json.safetensors", "not a factscope ledger")
    save_file(tensors, str(tmp_path / "a-list.safetensors"), metadata={"factscope_ledger": "[1]"})
    _one_line_error(tmp_path / "a-list.safetensors", "not a JSON object")


def test_a_failing_revert_keeps_the_original_exception(tiny_lm, records, caplog):
    """The error raised inside the block propagates; the revert's own failure is logged and noted on it."""
    lm = tiny_lm
    a = records[0]

    def spoil():  # a write behind the ledger's back: the revert on exit then refuses
        with torch.no_grad():
            lm.model.get_submodule(a.module).weight.add_(1.0)

    for block in ("edited", "ledger"):
        w0 = lm.model.get_submodule(a.module).weight.detach().clone()
        with pytest.raises(RuntimeError, match="boom") as info:
            if block == "edited":
                with edited(lm, [a]):
                    spoil()
                    raise RuntimeError("boom")
            else:
                with Ledger(lm) as ledger:
                    ledger.apply(a)
                    spoil()
                    raise RuntimeError("boom")
        assert any("reverting the edits afterwards failed" in n for n in getattr(info.value, "__notes__", []))
        assert "was changed outside" in caplog.text
        with torch.no_grad():
            lm.model.get_submodule(a.module).weight.copy_(w0)
        WeightBook.of(lm).discard()  # the weights were put back by hand
    # apply_all: the failing apply's error propagates even when undoing the earlier ones fails
    ledger = Ledger(lm)
    real = ledger.revert

    def failing_revert(record):
        raise EditError("cannot revert")

    ledger.revert = failing_revert
    with pytest.raises(EditError, match="already applied"):
        ledger.apply_all([a, a])
    ledger.revert = real
    ledger.revert_all()


def test_a_ledger_holds_one_cpu_copy_per_edited_matrix(mixed):
    """The snapshot the exact revert needs is on the CPU in the weights' dtype; what the ledger last wrote
    is remembered as a hash, not as a second copy of the matrix."""
    lm, (a, b), batch = mixed
    ledger = Ledger(lm)
    ledger.apply(a)
    ledger.apply(batch, verify=False)
    try:
        held = [t for v in vars(ledger.book).values() if isinstance(v, dict) for t in v.values() if isinstance(t, torch.Tensor)]
        matrix_bytes = sum(lm.model.get_submodule(m).weight.nbytes for m in set(batch.modules) | {a.module})
        assert all(t.device.type == "cpu" for t in held)
        assert sum(t.nbytes for t in held) == matrix_bytes  # the originals, once
    finally:
        ledger.revert_all()



def test_suspended_gives_the_unedited_model_and_restores_the_edits_bit_for_bit(tiny_lm, records):
    lm = tiny_lm
    original = _state(lm)
    ledger = Ledger(lm)
    ledger.apply_all(records)
    edited_state = _state(lm)
    with ledger.suspended() as suspended:
        assert suspended == tuple(records) and ledger.records == () and _same(lm, original)
    assert ledger.records == tuple(records) and _same(lm, edited_state)
    with pytest.raises(RuntimeError, match="inside"):
        with ledger.suspended():
            raise RuntimeError("inside")
    assert ledger.records == tuple(records) and _same(lm, edited_state)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rome_and_memit_apply_and_revert_bit_exactly_in_half_precision(dtype):
    """Weights in bfloat16 / float16: the edits are computed (v*, z and the solves in float32/float64),
    written in the weights' own dtype, and reverted to the same bits."""
    from tracer.edit import MemitHyperParams, Request, compute_memit

    lm = make_tiny_model("llama")
    lm.model.to(dtype)
    before = _state(lm)
    hp = _hp(lm)
    record = rome_edit(lm, REQUESTS[0], hp, stats="identity", progress=False)
    assert torch.isfinite(record.u).all() and torch.isfinite(record.v).all()
    batch = compute_memit(lm, [Request("Paris", "{} is the capital of", "Germany")],
                          MemitHyperParams(layers=(hp.layer - 1, hp.layer), v_steps=3), stats="identity",
                          templates=("{}",), progress=False, apply=False)
    with Ledger(lm) as ledger:
        ledger.apply(record)
        ledger.apply(batch, verify=False)
        w = lm.model.get_submodule(record.module).weight
        assert w.dtype == dtype and not _same(lm, before)
        ledger.revert(record)
        ledger.revert(batch)
        assert _same(lm, before)
