"""The guarded sequential runner: health read-out, a breach reverts exactly the offending batch,
a rerun resumes from the ledger (AlphaEdit's K_p included), settings are checked, the command."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_model
from tracer.cli import main
from tracer.edit import WeightBook, load_records
from tracer.edit.records import AlphaEditRecord, EditRecord
from tracer.edit.sequential import Health
from tracer.errors import FactscopeError, HyperParameterError
from tracer.evaluate.records import Case
from tracer.evaluate.sequence import Guard, run_sequence
from tracer.hooks import hooked

CASES = [Case(i, "counterfact", s, p, n, t) for i, (s, p, n, t) in enumerate([
    ("Paris", "{} is the capital of", "Germany", "France"), ("the cat", "I saw {} in", "the garden", "the house"),
    ("Rome", "The city of {} is in", "Spain", "Italy"), ("Berlin", "{} is a city in", "Japan", "Germany"),
    ("the dog", "{} likes to eat", "apples", "meat"), ("London", "{} lies on the river", "Seine", "Thames")])]
TEXTS = ["The weather was mild that year and the harvest was good.", "Music is played in the hall every evening."]
LAYERS = (1, 2)
RUN = dict(texts=TEXTS, entropy_prompts=2, entropy_length=16, retention_sample=4, progress=False)


def _weights(lm, layers=LAYERS):
    return [lm.model.get_submodule(lm.layers.mlp_out_name(l)).weight.detach().clone() for l in layers]


def _alpha_options(lm) -> dict:
    """AlphaEdit at layers 1-2 of a tiny Llama with C from every token of TEXTS (rank 26 of 64)."""
    got = {l: [] for l in LAYERS}
    inputs = {lm.layers.mlp_out_name(l): (lambda x, l=l: got[l].append(x[0].double())) for l in LAYERS}
    with torch.no_grad(), hooked(lm.model, inputs=inputs):
        for text in TEXTS:
            lm.model(torch.tensor([lm.tokenizer(text)["input_ids"]]))
    stats = {l: torch.cat(v).T @ torch.cat(v) / sum(x.shape[0] for x in v) for l, v in got.items()}
    return dict(layers=LAYERS, v_steps=3, stats=stats, nullspace_threshold=1e-9, threshold_mode="relative")


def _same(a, b) -> bool:
    """The same edit: equal ΔW and keys, bit for bit."""
    return all(torch.equal(x, y) for x, y in zip(a.deltas + a.keys, b.deltas + b.keys))


def _revert_all(lm, records):
    for r in reversed(records):
        WeightBook.of(lm).revert(r)


def test_guard_breach_reverts_the_offending_batch_bit_for_bit_and_a_rerun_resumes(tmp_path):
    lm = make_tiny_model("llama")
    options = _alpha_options(lm)
    w0 = _weights(lm)
    after: dict[int, list] = {}
    free = run_sequence(lm, "alphaedit", CASES, batch_size=2, out_dir=tmp_path / "free", method_options=options,
                        on_batch=lambda b, cases, records, health: after.__setitem__(b, _weights(lm)), **RUN)
    assert free.breach is None and len(free.records) == 3 and [h.n_edits for h in free.health] == [0, 2, 4, 6]
    assert all(isinstance(r, AlphaEditRecord) for r in free.records)
    h = free.health
    assert h[0].retention is None and h[2].retention is not None and all(x.entropy > 0 for x in h)
    growth = [max(x.norm_ratio.values()) for x in h]
    assert growth[0] == 1.0 and growth[1] < growth[2]
    _revert_all(lm, free.records)
    assert all(torch.equal(a, b) for a, b in zip(w0, _weights(lm)))

    guard = Guard(max_norm_growth=(growth[1] + growth[2]) / 2)
    out = tmp_path / "guarded"
    stopped = run_sequence(lm, "alphaedit", CASES, batch_size=2, out_dir=out, guard=guard, method_options=options, **RUN)
    b = stopped.breach
    assert b["batch"] == 2 and b["cases"] == [2, 3] and b["crossed"][0]["reading"].startswith("norm growth")
    assert b["crossed"][0]["value"] == pytest.approx(growth[2], abs=0) and b["reverted"]
    assert len(stopped.records) == 1 and _same(stopped.records[0], free.records[0])  # ids differ: they hold timings
    assert all(torch.equal(a, b) for a, b in zip(after[1], _weights(lm)))  # exactly the weights after batch 1
    assert [r.id for r in load_records(out / "ledger.safetensors")] == [stopped.records[0].id]
    assert json.loads((out / "health.json").read_text())["breach"]["batch"] == 2
    _revert_all(lm, stopped.records)

    resumed = run_sequence(lm, "alphaedit", CASES, batch_size=2, out_dir=out, method_options=options, **RUN)
    assert resumed.resumed == 1 and resumed.breach is None
    assert resumed.records[0].id == stopped.records[0].id
    assert all(_same(a, b) for a, b in zip(resumed.records, free.records))  # K_p rebuilt from the ledger's keys
    assert resumed.records[1].timings["z_reused"] == 2  # batch 2's z from the stopped run
    assert all(torch.equal(a, b) for a, b in zip(after[3], _weights(lm)))
    _revert_all(lm, resumed.records)
    with pytest.raises(FactscopeError, match="other settings"):
        run_sequence(lm, "alphaedit", CASES, batch_size=3, out_dir=out, method_options=options, **RUN)
    assert all(torch.equal(a, b) for a, b in zip(w0, _weights(lm)))


def test_rome_and_memit_sequences_keep_a_ledger_and_read_health(tmp_path):
    lm = make_tiny_model("gpt2")
    w0 = _weights(lm, (1,))
    rome = run_sequence(lm, "rome", CASES[:4], batch_size=2, out_dir=tmp_path / "rome", **RUN,
                        method_options=dict(layer=1, stats="identity", v_num_grad_steps=3,
                                            context_template_lengths=((5, 1),)))
    assert len(rome.records) == 4 and all(isinstance(r, EditRecord) for r in rome.records)
    assert [r.id for r in load_records(tmp_path / "rome" / "ledger.safetensors")] == [r.id for r in rome.records]
    assert rome.health[-1].efficacy is not None and rome.health[-1].norm_ratio[lm.layers.mlp_out_name(1)] > 1
    _revert_all(lm, rome.records)
    assert all(torch.equal(a, b) for a, b in zip(w0, _weights(lm, (1,))))
    memit = run_sequence(lm, "memit", CASES[:4], batch_size=2, out_dir=tmp_path / "memit", **RUN,
                         guard=Guard(min_retention=0.0),
                         method_options=dict(layers=LAYERS, v_steps=3, stats="identity", mom2_weight=1.0))
    assert len(memit.records) == 2 and memit.breach is None
    _revert_all(lm, memit.records)
    with pytest.raises(HyperParameterError, match="sequential editing takes"):
        run_sequence(lm, "ft-l", CASES, batch_size=2, out_dir=tmp_path / "x", **RUN)


def test_guard_readings_against_thresholds():
    unedited = Health(0, 0, {"a": 1.0}, 20.0, 0.0, entropy=5.0)
    health = Health(3, 30, {"a": 1.05, "b": 1.12}, 22.5, 1.0, entropy=4.6, efficacy=1.0, retention=0.75)
    crossed = Guard(max_norm_growth=1.1, max_perplexity_rise=0.1, max_entropy_drop=0.05, min_retention=0.8).breaches(health, unedited)
    assert [(c["reading"], round(c["value"], 4)) for c in crossed] == [
        ("norm growth of b", 1.12), ("perplexity rise", 0.125), ("entropy drop", 0.08), ("retention", 0.75)]
    assert Guard(max_norm_growth=1.2, max_perplexity_rise=0.2, max_entropy_drop=0.1, min_retention=0.7).breaches(health, unedited) == []
    with pytest.raises(HyperParameterError):
        Guard(min_retention=2)
    assert Guard.from_dict(Guard(max_norm_growth=1.1).to_dict()) == Guard(max_norm_growth=1.1)


def test_sequential_command_runs_resumes_and_reports_a_breach(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "seq"
    base = ["sequential", "--model", str(tiny_model_dir), "--method", "alphaedit", "--dataset", "counterfact",
            "--limit", "4", "--batch-size", "2", "--layers", "1-2", "--hparam", "v_steps=2", "--hparam",
            "mom2_n_tokens=2000", "--hparam", "threshold_mode=energy", "--hparam", "nullspace_threshold=0.05",
            "--entropy-prompts", "2", "--retention-sample", "2", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert main(base + ["--max-norm-growth", "1.0"]) == 3
    text = capsys.readouterr().out
    assert "guard: batch 1 (cases " in text and "crossed norm growth" in text and "keeps no batch" in text
    assert main(base) == 0
    text = capsys.readouterr().out
    assert "4 edits kept" in text and len(load_records(out / "ledger.safetensors")) == 2
    assert main(base) == 0 and "resumed after batch 2" in capsys.readouterr().out
    assert main(base[:-2] + ["--out", str(tmp_path / "bad"), "--min-retention", "3"]) == 2
