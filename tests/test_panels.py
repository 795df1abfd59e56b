"""widgets/panels.py driven without a browser: controls -> tracer -> figures updated in place."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_tiny_model
from float32 import prob_tol

pytest.importorskip("jupyter_bokeh")

from tracer.trace import trace_all  # noqa: E402
from widgets.panels import LensPanel, TracePanel, _parse_targets  # noqa: E402

PROMPT = "The Eiffel Tower is in Paris"


@pytest.fixture(scope="module")
def lm():
    return make_tiny_model("llama")


def test_trace_panel_subject_guess_and_preview(lm):
    panel = TracePanel(lm, prompt=PROMPT, samples=2, noise="0.5")
    assert panel.subject.value == "The Eiffel Tower"
    assert panel.tokens.value.count("font-weight:bold") >= 2  # the subject's tokens are highlighted
    panel.prompt.value = "Rome is the capital of Italy"
    assert panel.subject.value == "Rome"  # follows the prompt until the user edits it
    panel.subject.value = "Italy"
    panel.prompt.value = "Italy is in Europe"
    assert panel.subject.value == "Italy"
    panel.subject.value = "Spain"
    assert "does not occur" in panel.tokens.value


def test_trace_panel_runs_and_updates_in_place(lm):
    panel = TracePanel(lm, prompt=PROMPT, subject="Eiffel Tower", samples=2, noise="0.5", kind="all")
    results = panel.run()
    assert set(results) == {"hidden", "mlp", "attn"}
    fig = panel.figures["hidden"]
    source = fig.select_one({"name": "trace"})
    np.testing.assert_array_equal(np.asarray(source.data["score"]), results["hidden"].scores.ravel())
    views = list(panel.plots.children)
    panel.kind.value = "hidden"
    panel.subject.value = "Paris"
    again = panel.run()
    assert panel.figures["hidden"] is fig and fig.select_one({"name": "trace"}) is source  # updated, not rebuilt
    assert panel.plots.children[0] is views[0]
    np.testing.assert_array_equal(np.asarray(source.data["score"]), again["hidden"].scores.ravel())
    assert fig.yaxis[0].major_label_overrides[len(again["hidden"].tokens) - 1].text.endswith(" *")  # new subject marked
    assert panel.progress.value == panel.progress.max


def test_trace_panel_click_shows_restored_run(lm):
    panel = TracePanel(lm, prompt=PROMPT, subject="Eiffel Tower", samples=2, noise="0.5", kind="hidden")
    result = panel.run()["hidden"]
    source = panel.figures["hidden"].select_one({"name": "trace"})
    t, layer = result.subject_span[1] - 1, 1
    cell = source.data["row"].index(t) + layer
    source.selected.indices = [cell]  # what a click in the browser does (the view is computed in a thread)
    assert panel.wait(60)
    grid = panel.lens_layout.select_one({"name": "lens_curves"}).data
    # the panel replays the restored run as one full forward pass with hooks (tracer.lens.restored_lens);
    # the trace's score came from the batched engine with a key/value cache: float32 sums in other
    # orders along the whole path (tests/float32.py)
    assert grid["prob"][0][-1] == pytest.approx(result.scores[t, layer], abs=prob_tol(lm, len(result.tokens)))
    assert "restored" in panel.status.value


def test_errors_are_shown_in_the_panel(lm):
    panel = TracePanel(lm, prompt=PROMPT, subject="Eiffel Tower", samples=2, noise="loud")
    panel.run_button.click()
    assert panel.wait(60)
    assert "noise" in panel.status.value and "\u26a0" in panel.status.value
    assert panel.results == {}


def test_lens_panel_without_ledger(lm):
    panel = LensPanel(lm, prompt=PROMPT, targets="Paris, Rome")
    assert panel.compare.disabled
    (lens,) = panel.run()
    layout = panel.layouts[0][0]
    assert layout.select_one({"name": "lens_grid"}).data["prob"] == lens.top_probs.ravel().tolist()
    assert "answer" in panel.status.value


def test_parse_targets():
    assert _parse_targets("Paris, Rome ,") == [" Paris", " Rome"]


def test_trace_panel_passes_noise_text_to_tracer(lm):
    """A number typed as text and a multiple like "2s" both reach tracer.noise, which parses them."""
    panel = TracePanel(lm, prompt=PROMPT, subject="Eiffel Tower", samples=2, noise=" 0.25 ", kind="hidden")
    assert panel.run()["hidden"].noise.scale == 0.25
    panel.noise.value = "2s"
    noise = panel.run()["hidden"].noise
    assert noise.multiple == 2.0 and noise.scale > 0


def test_edit_panel_layer_comes_from_the_engine_suggestion(lm, tmp_path, monkeypatch):
    from test_figures import make_trace
    from tracer.trace_result import suggest_layer
    from widgets.panels import EditPanel

    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache"))
    trace = make_trace("mlp", span=(1, 3), n_layers=lm.n_layers, seed=7)
    panel = EditPanel(lm, trace=trace)
    assert panel.layer.value == suggest_layer(trace) == int(trace.scores[2].argmax())


@pytest.fixture
def edit_panel(lm, tmp_path, monkeypatch):
    from widgets.panels import EditPanel

    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache"))
    return EditPanel(lm, subject="The Eiffel Tower", prompt="{} is in", target="Rome",
                     paraphrases=("The Eiffel Tower stands in",), neighbours=("The Louvre is in",),
                     hparams={"stats_tokens": 2000, "v_num_grad_steps": 5})


def test_edit_panel_edit_undo_save(edit_panel, lm, tmp_path):
    import torch

    weight = lm.model.get_submodule(lm.layers.mlp_out_name(edit_panel.layer.value)).weight
    original = weight.detach().clone()
    check = edit_panel.run()
    assert len(edit_panel.ledger.records) == 1 and not torch.equal(weight, original)
    data = edit_panel.layout_.select_one({"name": "edit_checks"}).data
    assert data["p_new"][:2] == [check.prompts[0].before.p_new, check.prompts[0].after.p_new]
    assert data["group"][2] == "paraphrase" and data["group"][4] == "neighbour"
    assert edit_panel.ledger.records[0].id in edit_panel.ledger_view.value
    source = edit_panel.layout_.select_one({"name": "edit_checks"})
    edit_panel.target.value = "Berlin"
    edit_panel.run()  # a second edit: same figure, new data
    assert edit_panel.layout_.select_one({"name": "edit_checks"}) is source and len(edit_panel.ledger.records) == 2
    saved = edit_panel.save(str(tmp_path / "edits.safetensors"))
    assert saved.is_file()
    edit_panel.undo()
    edit_panel.undo()
    assert torch.equal(weight, original)  # bit for bit
    assert "no edits" in edit_panel.ledger_view.value
    edit_panel.undo_button.click()  # nothing left: a one-line message in the panel
    assert edit_panel.wait(60)
    assert "no edit to undo" in edit_panel.status.value


def test_lens_panel_compares_before_edits(edit_panel, lm):
    plain = LensPanel(lm, prompt="The Eiffel Tower is in", targets="Rome").run()[0]
    edit_panel.run()
    try:
        panel = LensPanel(lm, prompt="The Eiffel Tower is in", targets="Rome", ledger=edit_panel.ledger)
        panel.compare.value = True
        before, after = panel.run()
        assert before.label == "before edits" and after.label == "edited"
        np.testing.assert_array_equal(before.top_probs, plain.top_probs)
        assert not np.allclose(after.top_probs, plain.top_probs)  # the view of the edited model differs
        assert len(edit_panel.ledger.records) == 1  # re-applied after the comparison
    finally:
        edit_panel.ledger.revert_all()


def test_ledger_view_lists_a_memit_batch_and_undo_reverts_it(lm, tmp_path, monkeypatch):
    import torch

    from tracer.edit import Ledger
    from tracer.edit import MemitHyperParams, Request, compute_memit
    from widgets.panels import EditPanel

    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache"))
    batch = compute_memit(lm, [Request("The Eiffel Tower", "{} is in", "Rome"), Request("The Louvre", "{} is in", "Berlin")],
                          MemitHyperParams(layers=(0, 1), v_steps=2), stats="identity", templates=("{}",),
                          progress=False, apply=False)
    ledger = Ledger(lm)
    original = {m: lm.model.get_submodule(m).weight.detach().clone() for m in batch.modules}
    ledger.apply(batch)
    panel = EditPanel(lm, ledger=ledger)
    assert batch.id in panel.ledger_view.value and "MEMIT: The Eiffel Tower is in (+1 more)" in panel.ledger_view.value
    assert "0\u20131" in panel.ledger_view.value  # its layer range
    panel.undo()
    assert all(torch.equal(lm.model.get_submodule(m).weight, w) for m, w in original.items())


def test_panel_figures_show_hostile_text_literally(lm, tmp_path, monkeypatch):
    """Tokens, answers, targets and prompts typed into (or produced by) a panel are never TeX in
    its Bokeh figures and never markup in its HTML lines."""
    from dataclasses import replace

    from test_figures import make_trace
    from test_report import HOSTILE_TOKENS
    from test_text import HOSTILE, HOSTILE_TEXTS, math_exposures
    from widgets.panels import EditPanel

    trace_panel = TracePanel(lm, prompt=PROMPT, samples=2, noise="0.5")
    trace_panel.show({"hidden": replace(make_trace("hidden"), tokens=HOSTILE_TOKENS, answer=HOSTILE,
                                                  subject_span=(4, 6))})
    fig = trace_panel.figures["hidden"]
    assert math_exposures(fig) == []
    assert fig.yaxis[0].major_label_overrides[1].text == HOSTILE_TOKENS[1]
    assert repr(HOSTILE) in fig.select_one({"name": "trace_subtitle"}).text.text
    assert "<script>" not in trace_panel.status.value
    lens_panel = LensPanel(lm, prompt=f"{HOSTILE} {PROMPT}", targets=HOSTILE_TEXTS[1])
    lens_panel.run()
    assert math_exposures(lens_panel.layouts[0][0]) == []

    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache"))
    edit_panel = EditPanel(lm, subject="The Eiffel Tower", prompt="{} is in", target=HOSTILE,
                           paraphrases=(HOSTILE_TEXTS[1] + " The Eiffel Tower stands in",),
                           neighbours=(HOSTILE_TEXTS[3],),
                           hparams={"stats_tokens": 2000, "v_num_grad_steps": 2})
    try:
        edit_panel.run()
        assert math_exposures(edit_panel.layout_) == []
        assert HOSTILE.strip() in edit_panel.layout_.select_one({"name": "edit_new"}).title.text.text
        for widget in (edit_panel.status, edit_panel.ledger_view):
            assert "<script>" not in widget.value and "<b>&amp;" not in widget.value
        assert "&lt;script&gt;" in edit_panel.layout_.select_one({"name": "edit_table"}).text
    finally:
        edit_panel.ledger.revert_all()


# ------------------------------------------------------------------ issue 20.5: panels that work together
EDIT_HPARAMS = {"stats_tokens": 2000, "v_num_grad_steps": 5}


def _weights(lm) -> dict:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _same_weights(lm, weights) -> bool:
    return all(torch.equal(v, weights[k]) for k, v in lm.model.state_dict().items())


def test_edit_panel_follows_the_trace_panel(lm, tmp_path, monkeypatch):
    """The trace panel's strongest MLP layer (at the last subject token) becomes the edit's layer, and
    its prompt and subject the edit's, each time it shows traces."""
    from tracer.trace_result import suggest_layer
    from widgets.panels import EditPanel

    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache"))
    trace = TracePanel(lm, prompt=PROMPT, subject="Eiffel Tower", samples=2, noise="0.5", kind="mlp")
    edit = EditPanel(lm, trace=trace)
    assert edit.layer.value == edit.default_layer and edit.trace_edited.value
    assert (edit.prompt.value, edit.subject.value) == ("The {} is in Paris", "Eiffel Tower")
    mlp = trace.run()["mlp"]
    last = mlp.subject_span[1] - 1
    assert edit.layer.value == suggest_layer(mlp) == int(np.argmax(mlp.scores[last]))
    assert "strongest MLP layer" in edit.layer_hint.value
    trace.prompt.value, trace.subject.value = "Rome is the capital of Italy", "Rome"
    other = trace.run()["mlp"]
    assert (edit.prompt.value, edit.subject.value) == ("{} is the capital of Italy", "Rome")
    assert edit.layer.value == int(np.argmax(other.scores[other.subject_span[1] - 1]))


def test_edit_panel_shows_the_edited_trace_next_to_the_original(lm, tmp_path, monkeypatch):
    """After Edit, the edited model is traced with the original trace's settings (same noise draws):
    original | edited | difference, where the edited trace is the model's with the edit applied, and
    Undo takes it away with the edit."""
    from widgets.figures import restored_fraction
    from widgets.panels import EditPanel

    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache"))
    trace = TracePanel(lm, prompt="The Eiffel Tower is in", subject="The Eiffel Tower", samples=2, noise="0.5",
                       kind="mlp")
    original = trace.run()["mlp"]
    edit = EditPanel(lm, trace=trace, target="Rome", paraphrases=(), neighbours=(), hparams=EDIT_HPARAMS)
    weights = _weights(lm)
    try:
        edit.run()
        after = edit.edited_traces["mlp"]
        assert (after.noise, after.samples, after.seed, after.window) == (original.noise, 2, original.seed, original.window)
        again = trace_all(lm, original.prompt, original.subject, kinds=("mlp",), samples=2, noise=original.noise,
                          seed=original.seed, progress=False)["mlp"]
        np.testing.assert_array_equal(after.scores, again.scores)  # the edited model's trace
        assert not np.array_equal(after.scores, original.scores)
        first, second, diff = edit.comparisons["mlp"].children
        assert first.select_one({"name": "trace"}).data["score"] == original.scores.ravel().tolist()
        assert second.select_one({"name": "trace"}).data["score"] == after.scores.ravel().tolist()
        np.testing.assert_allclose(diff.select_one({"name": "trace_diff"}).data["diff"],
                                   (restored_fraction(after) - restored_fraction(original)).ravel())
        assert first.title.text.text.startswith("Original") and second.title.text.text.startswith("Edited")
        assert len(edit.edited_box.children) == 1
        edit.undo_button.click()
        assert edit.wait(60) and "reverted" in edit.status.value
        assert edit.edited_box.children == () and _same_weights(lm, weights)
    finally:
        edit.ledger.revert_all()


@pytest.mark.parametrize("when", ["computing the edit", "tracing the edited model"])
def test_cancel_leaves_the_model_and_the_ledger_unchanged(lm, tmp_path, monkeypatch, when):
    """Cancel pressed while Edit works in its thread, before the edit is applied (key statistics)
    or after (the edited model's trace): the weights are bit for bit those before, the ledger is
    empty, nothing is shown, and the panel says so."""
    from tracer.hooks import active_hook_count
    from widgets.panels import EditPanel

    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache"))
    trace = TracePanel(lm, prompt="The Eiffel Tower is in", subject="The Eiffel Tower", samples=2, noise="0.5",
                       kind="mlp")
    trace.run()
    edit = EditPanel(lm, trace=trace, target="Rome", paraphrases=(), neighbours=(), hparams=EDIT_HPARAMS)
    weights = _weights(lm)
    steps = []
    shown = edit._on_step

    def on_step(step):  # Cancel pressed when the chosen stage reports its first step
        steps.append((step.desc, bool(edit.ledger.records)))
        if when == "computing the edit" or step.desc.startswith("trace"):
            edit.cancel()
        shown(step)

    monkeypatch.setattr(edit, "_on_step", on_step)
    edit.run_button.click()
    assert edit.wait(600)
    assert "cancelled" in edit.status.value and "as it was" in edit.status.value
    assert edit.ledger.records == () and _same_weights(lm, weights) and active_hook_count(lm.model) == 0
    assert edit.checks == [] and edit.layout_ is None and edit.edited_box.children == ()
    assert not edit.run_button.disabled and edit.cancel_button.layout.visibility == "hidden"
    applied = [on for desc, on in steps]
    assert applied[-1] == (when == "tracing the edited model")  # cancelled after the edit was applied: reverted
    monkeypatch.setattr(edit, "_on_step", shown)
    edit.target.value = "Berlin"
    edit.run_button.click()  # the panel works again
    assert edit.wait(600) and len(edit.ledger.records) == 1
    edit.ledger.revert_all()
    assert _same_weights(lm, weights)


def test_cancelled_trace_keeps_the_traces_shown(lm, monkeypatch):
    panel = TracePanel(lm, prompt=PROMPT, subject="Eiffel Tower", samples=2, noise="0.5", kind="hidden")
    results = panel.run()
    data = list(panel.figures["hidden"].select_one({"name": "trace"}).data["score"])
    shown = panel._on_step
    monkeypatch.setattr(panel, "_on_step", lambda step: (panel.cancel(), shown(step)))
    panel.subject.value = "Paris"
    panel.run_button.click()
    assert panel.wait(120) and "cancelled" in panel.status.value
    assert panel.results["hidden"] is results["hidden"] and panel.figures["hidden"].select_one({"name": "trace"}).data["score"] == data
