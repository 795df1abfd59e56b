"""AlphaEdit: the projected update, its null-space invariant, K_p of a sequence, records and files."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_model
from float32 import U32
from tracer.edit import Ledger, MemitHyperParams, Request, WeightBook, compute_memit, load_records, save_records
from tracer.edit.alphaedit import AlphaEditor, compute_alphaedit, null_space_projector, projected_update
from tracer.edit.hparams import AlphaEditHyperParams
from tracer.edit.memit import solve_update
from tracer.edit.records import AlphaEditRecord
from tracer.errors import EditError, HyperParameterError
from tracer.evaluate import run_evaluation
from tracer.evaluate.methods import make_method
from tracer.evaluate.records import load_cases
from tracer.hooks import hooked

REQS = [Request("Paris", "{} is the capital of", "Germany"), Request("the cat", "I saw {} in", "the garden"),
        Request("Rome", "The city of {} is in", "Spain")]
PRESERVED = ["The weather was mild that year.", "Music is played in the hall."]
HP = AlphaEditHyperParams(layers=(1, 2), v_steps=3, nullspace_threshold=1e-9, threshold_mode="relative")


def _weights(lm, layers):
    return [lm.model.get_submodule(lm.layers.mlp_out_name(l)).weight.detach().clone() for l in layers]


def _preserved_keys(lm, layers, texts=PRESERVED) -> dict[int, torch.Tensor]:
    """Keys ("tokens d_k", float64) at every position of ``texts``, on the current weights."""
    got: dict[int, list] = {l: [] for l in layers}
    inputs = {lm.layers.mlp_out_name(l): (lambda x, l=l: got[l].append(x[0].double())) for l in layers}
    with torch.no_grad(), hooked(lm.model, inputs=inputs):
        for text in texts:
            lm.model(torch.tensor([lm.tokenizer(text)["input_ids"]]))
    return {l: torch.cat(v) for l, v in got.items()}


def _hidden(lm, texts=PRESERVED) -> list[torch.Tensor]:
    with torch.no_grad():
        return [lm.model(torch.tensor([lm.tokenizer(t)["input_ids"]]), output_hidden_states=True).hidden_states[-1]
                for t in texts]


@pytest.fixture(scope="module")
def preserved():
    """A tiny Llama and C from the keys of every token of two preserved texts (28 tokens: rank 28
    of d_k = 64, so the null space has 36 dimensions)."""
    lm = make_tiny_model("llama")
    K0 = _preserved_keys(lm, HP.layers)
    return lm, K0, {l: (k.T @ k / k.shape[0], {"kind": "given", "tokens": k.shape[0]}) for l, k in K0.items()}


def test_projected_update_solves_alphaedits_normal_equations():
    """ΔW = R Kᵀ P (M P + l2 I)⁻¹ P is the minimiser of ‖ΔW K − R‖² + ‖ΔW K_p‖² + l2 ‖ΔW‖² over
    ΔW = ΔW P: its normal equations ΔW (M P + l2 I) = R Kᵀ P hold, ΔW (I − P) = 0, and with
    P = I and no K_p it is MEMIT's solve with C = I and λ = l2."""
    g = torch.Generator().manual_seed(0)
    d_k, n, out = 12, 5, 4
    K = torch.randn(n, d_k, generator=g, dtype=torch.float64)
    R = torch.randn(n, out, generator=g, dtype=torch.float64)
    Kp = torch.randn(7, d_k, generator=g, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(d_k, 8, generator=g, dtype=torch.float64))[0]
    P = basis @ basis.T
    dw = projected_update(K, R, P, Kp.T @ Kp, 2.0)
    M = K.T @ K + Kp.T @ Kp
    scale = float(dw.abs().max())
    assert float((dw @ (M @ P + 2.0 * torch.eye(d_k, dtype=torch.float64)) - R.T @ K @ P).abs().max()) < 1e-12 * max(1, scale) * 100
    assert float((dw @ (torch.eye(d_k, dtype=torch.float64) - P)).abs().max()) < 1e-14
    eye = torch.eye(d_k, dtype=torch.float64)
    assert float((projected_update(K, R, eye, None, 2.0) - solve_update(K, R, None, 2.0)).abs().max()) < 1e-13


def test_projector_spans_the_eigenvectors_below_the_threshold():
    evals = torch.tensor([1e-4, 5e-3, 1e-2, 0.5, 3.0], dtype=torch.float64)
    Q = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64))[0]
    C = Q @ torch.diag(evals) @ Q.T
    proj = null_space_projector(C, 5, 2e-2)
    assert proj.info["null_dim"] == 3 and proj.info["d_k"] == 5
    assert torch.allclose(proj.P, Q[:, :3] @ Q[:, :3].T, atol=1e-12)
    assert null_space_projector(C, 5, 2e-3, "relative").info["null_dim"] == 2  # below 6e-3
    energy = null_space_projector(C, 5, 0.002, "energy").info  # 1e-4 + 5e-3 <= 0.002 * 3.5151 < + 1e-2
    assert energy["null_dim"] == 2 and abs(energy["null_energy"] - 5.1e-3 / 3.5151) < 1e-12
    assert null_space_projector(None, 5, 2e-2).info["null_dim"] == 0


def test_the_edit_leaves_preserved_keys_and_hidden_states_unchanged(preserved):
    """The invariant: ΔW K₀ = 0 for the keys C was read from, to the rounding of ΔW to float32
    (|fl(ΔW) − ΔW| ≤ u |ΔW| per element, so |ΔW K₀| ≤ u |ΔW| |K₀|); the edited model's last hidden
    states on the preserved texts move by float32 rounding of W + ΔW only, against MEMIT's (C = I)
    whole-model change; the edited requests' hidden states move; revert is bit-exact."""
    lm, K0, stats = preserved
    w0 = _weights(lm, HP.layers)
    h0 = _hidden(lm)
    record = compute_alphaedit(lm, REQS, HP, statistics=stats, templates=("{}",), progress=False)
    try:
        assert record.method == "AlphaEdit" and [p["null_dim"] for p in record.projection] == [36, 36]
        for i, l in enumerate(HP.layers):
            d = record.deltas[i].double()
            assert float(d.norm()) > 0.1
            assert float(((d @ K0[l].T).abs() / (U32 * d.abs() @ K0[l].abs().T)).max()) <= 1
        alpha = max(float((a - b).abs().max()) for a, b in zip(_hidden(lm), h0))
        moved = _hidden(lm, [r.text for r in REQS])
    finally:
        record.revert(lm)
    assert all(torch.equal(a, b) for a, b in zip(w0, _weights(lm, HP.layers)))
    memit = compute_memit(lm, REQS, MemitHyperParams(layers=HP.layers, v_steps=3, mom2_weight=1.0), stats="identity",
                          templates=("{}",), progress=False)
    try:
        change = max(float((a - b).abs().max()) for a, b in zip(_hidden(lm), h0))
    finally:
        memit.revert(lm)
    before = _hidden(lm, [r.text for r in REQS])
    assert alpha < 1e-4 and change > 1000 * alpha
    assert max(float((a - b).abs().max()) for a, b in zip(moved, before)) > 1000 * alpha


def test_a_sequence_keeps_earlier_keys_and_forgets_exactly(preserved, tmp_path):
    """K_p: batch 2 is solved with batch 1's keys (‖ΔW₂ K₁‖ is far below what the same batch does
    without them); forget() rebuilds K_p as if the batch was never written; records round-trip
    through a ledger file with their keys; a resumed editor (remember) computes the same bits."""
    lm, _, stats = preserved
    w0 = _weights(lm, HP.layers)
    editor = AlphaEditor(lm, HP, statistics=stats, templates=("{}",), progress=False)
    first = editor.edit(REQS[:2])
    assert torch.equal(editor.previous(1), first.keys[0].double().T @ first.keys[0].double())
    second = editor.edit(REQS[2:])
    alone = AlphaEditor(lm, HP, statistics=stats, templates=("{}",), progress=False).edit(REQS[2:], apply=False)
    for i in range(2):
        with_kp = float((second.deltas[i].double() @ first.keys[i].double().T).norm())
        without = float((alone.deltas[i].double() @ first.keys[i].double().T).norm())
        assert with_kp < 0.5 * without
    path = tmp_path / "seq.safetensors"
    save_records([first, second], path)
    loaded = load_records(path)
    assert [type(r) for r in loaded] == [AlphaEditRecord] * 2 and [r.id for r in loaded] == [first.id, second.id]
    assert all(torch.equal(a, b) for a, b in zip(loaded[1].keys, second.keys))
    editor.forget(second)
    assert editor.remembered == (first,)
    editor.forget(first)
    assert editor.previous(1) is None
    second.revert(lm)
    first.revert(lm)
    assert all(torch.equal(a, b) for a, b in zip(w0, _weights(lm, HP.layers)))
    Ledger(lm).apply(loaded[0])
    resumed = AlphaEditor(lm, HP, statistics=stats, templates=("{}",), progress=False)
    resumed.remember(loaded[0])
    again = resumed.edit(REQS[2:], apply=False)
    assert all(torch.equal(a, b) for a, b in zip(again.deltas, second.deltas))
    WeightBook.of(lm).revert(loaded[0])


def test_alphaedit_files_verify_every_field(preserved, tmp_path):
    lm, _, stats = preserved
    record = compute_alphaedit(lm, REQS[:1], HP, statistics=stats, templates=("{}",), progress=False, apply=False)
    meta = record.to_dict()
    assert meta["method"] == "AlphaEdit" and meta["hparams"]["nullspace_threshold"] == 1e-9
    again = AlphaEditRecord.from_dict(meta, record.deltas, record.keys)
    assert again.id == record.id
    bad = [k.clone() for k in record.keys]
    bad[0][0, 0] += 1
    with pytest.raises(EditError, match="does not verify"):
        AlphaEditRecord.from_dict(meta, record.deltas, bad)
    with pytest.raises(EditError, match="does not verify"):
        AlphaEditRecord.from_dict({**meta, "projection": [dict(p, null_dim=1) for p in meta["projection"]]},
                                  record.deltas, record.keys)
    with pytest.raises(EditError, match="key tensors"):
        AlphaEditRecord.from_dict(meta, record.deltas, record.keys[:1])


def test_settings_are_checked():
    with pytest.raises(HyperParameterError, match="nullspace_threshold and l2"):
        AlphaEditHyperParams(layers=(1,), l2=0)
    with pytest.raises(HyperParameterError, match="threshold_mode"):
        AlphaEditHyperParams(layers=(1,), threshold_mode="sometimes")
    hp = AlphaEditHyperParams(layers=(1, 2), threshold_mode="relative")
    assert AlphaEditHyperParams.from_dict(hp.to_dict()) == hp
    with pytest.raises(HyperParameterError, match="unknown"):
        AlphaEditHyperParams.from_dict({**hp.to_dict(), "lambda": 3})
    lm = make_tiny_model("gpt2")
    with pytest.raises(HyperParameterError, match="leaves no null space"):
        AlphaEditor(lm, AlphaEditHyperParams(layers=(1,)), stats="identity", templates=("{}",), progress=False)


def test_evaluate_harness_runs_alphaedit_on_whole_batches_and_restores_weights(preserved, tmp_path):
    """``factscope evaluate --method alphaedit``: every case in one batch by default, the edit in
    place while measured (EM moves up), the weights bit-exact afterwards, K_p empty again."""
    lm, _, stats = preserved
    rec = {"case_id": 7, "requested_rewrite": {"prompt": "{} is located in", "relation_id": "P1", "subject": "The tower",
                                               "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
           "paraphrase_prompts": ["People say that The tower is in"],
           "neighborhood_prompts": ["The museum is located in", "The bridge is located in"]}
    data = tmp_path / "cf.json"
    data.write_text(json.dumps([rec, {**rec, "case_id": 8}]))
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    options = {"layers": HP.layers, "v_steps": 15, "stats": {l: c for l, (c, _) in stats.items()},
               "nullspace_threshold": 1e-9, "threshold_mode": "relative"}
    s = run_evaluation(lm, "alphaedit", "counterfact", tmp_path / "run", data_path=data, batch_size=None,
                       generation=False, method_options=options, progress=False)
    assert s["settings"]["batch_size"] == 2 and s["settings"]["method_settings"]["projection"][0]["null_dim"] == 36
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    assert s["n_cases"] == 2 and s["post"]["EM"]["mean"] > s["pre"]["EM"]["mean"]
    method = make_method("alphaedit", lm, **options)
    handle = method.apply(lm, load_cases("counterfact", data))
    assert method.editor.remembered == (handle,)
    method.revert(lm, handle)
    assert method.editor.remembered == () and all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
