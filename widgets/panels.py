"""Notebook panels: ipywidgets controls around the figures of :mod:`widgets.figures`.

    from widgets import TracePanel, LensPanel, EditPanel
    TracePanel("smollm2-135m")      # prompt, subject, kind, samples, noise -> heat maps
    LensPanel(lm)                   # prompt -> layer-by-layer view (before/after edits)
    EditPanel(lm)                   # ROME edit with before/after checks, undo, ledger

Bokeh figures sit inside the widget layout through jupyter_bokeh's ``BokehModel``. All work is
done by :mod:`tracer`; the panels only call it and update the figures' data sources in place.
Errors raised in a callback appear inside the panel (``Output.capture``): a factscope error as
one line, anything else with its traceback. :func:`setup_notebook` loads BokehJS from the
installed bokeh package (no CDN); a panel calls it if the notebook has not.
"""
from __future__ import annotations

import html
import logging
from typing import Callable

import ipywidgets as W
import torch
from bokeh.io import output_notebook
from bokeh.io.state import curstate
from bokeh.plotting import show as bokeh_show
from bokeh.resources import INLINE
from jupyter_bokeh import BokehModel

from tracer.edit import EditRequest, Ledger, ROMEHyperParams, check_edit, rome_edit
from tracer.errors import EditError, FactscopeError
from tracer.lens import logit_lens, restored_lens
from tracer.models import LanguageModel, as_model
from tracer.subject import guess_subject, tokenize_with_subject
from tracer.targets import spaced
from tracer.trace import trace_all
from tracer.trace_result import KINDS, suggest_layer

from .figures import (edit_comparison, lens_figure, token_label, trace_heatmap, update_edit_comparison,
                      update_lens_figure, update_trace_heatmap)
from .text import literal

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "The Eiffel Tower is located in the city of"


def setup_notebook(threads: int | None = None) -> None:
    """Load BokehJS into the notebook from the installed package (works offline); with
    ``threads``, also set torch's CPU thread count."""
    if threads is not None:
        torch.set_num_threads(int(threads))
    output_notebook(resources=INLINE, hide_banner=True)


def _view(layout) -> BokehModel:
    """A Bokeh layout inside the widget layout, every text of it literal (no TeX, see
    :mod:`widgets.text`); the figures' updaters keep it so."""
    return BokehModel(literal(layout))


def _error_line(text: str) -> str:
    return f"<span style='color:#b00020'>\u26a0 {html.escape(text)}</span>"


class _Panel(W.VBox):
    """Shared plumbing: a status line, an error area, and a guard for callbacks."""

    def __init__(self, model: LanguageModel | str, **kwargs):
        super().__init__(**kwargs)
        if not curstate().notebook:  # BokehJS must be in the page before a BokehModel renders
            setup_notebook()
        self.lm = as_model(model)
        self.status = W.HTML(value="")
        self.errors = W.Output(layout=W.Layout(max_height="300px", overflow="auto"))
        self.progress = W.IntProgress(value=0, min=0, max=1, description="", layout=W.Layout(width="300px", visibility="hidden"))

    def _guard(self, fn: Callable[[], object]) -> Callable[..., None]:
        """A callback running ``fn`` with errors shown in the panel instead of lost."""

        def callback(*_args):
            self.errors.clear_output()
            with self.errors:  # Output captures and shows any traceback
                try:
                    fn()
                except FactscopeError as e:
                    self.status.value = _error_line(str(e))
                finally:
                    self.progress.layout.visibility = "hidden"

        return callback

    def _in_output(self, fn: Callable[[], object]):
        """``fn()`` with its output (tqdm bars) shown in the panel. An ``Output`` context swallows
        exceptions inside a kernel, so they are carried out of it and re-raised."""
        outcome: dict = {}
        with self.errors:
            try:
                outcome["value"] = fn()
            except BaseException as e:  # noqa: BLE001 (re-raised below)
                outcome["error"] = e
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def _busy(self, text: str, steps: int) -> None:
        self.status.value = html.escape(text)
        self.progress.max, self.progress.value = max(1, steps), 0
        self.progress.layout.visibility = "visible"

    def _done(self, text: str) -> None:
        self.progress.value = self.progress.max
        self.progress.layout.visibility = "hidden"
        self.status.value = html.escape(text)


def _parse_targets(text: str) -> list[str]:
    """The "follow" field: ``"Paris, Rome"`` -> ``[" Paris", " Rome"]`` (each word as a target,
    :func:`tracer.targets.spaced`)."""
    return [spaced(part.strip()) for part in text.split(",") if part.strip()]


class TracePanel(_Panel):
    """Causal tracing in a notebook.

    Controls: prompt, subject (pre-filled by a guess; its tokens are highlighted before running),
    kind, samples, noise; Run shows one heat map per kind. Clicking a cell shows the
    layer-by-layer view of that restored run below the heat maps. ``panel.run()`` does what the
    button does and returns the results (``dict kind -> TraceResult``).
    """

    def __init__(self, model: LanguageModel | str, prompt: str = DEFAULT_PROMPT, subject: str | None = None,
                 kind: str = "all", samples: int = 10, noise: str = "3s"):
        super().__init__(model)
        self.prompt = W.Text(value=prompt, description="prompt", layout=W.Layout(width="640px"))
        self.subject = W.Text(value=subject if subject is not None else guess_subject(prompt), description="subject",
                              layout=W.Layout(width="420px"))
        self.tokens = W.HTML(value="")
        self.kind = W.Dropdown(options=["all", *KINDS], value=kind, description="kind", layout=W.Layout(width="200px"))
        self.samples = W.BoundedIntText(value=samples, min=1, max=1000, description="samples", layout=W.Layout(width="160px"))
        self.noise = W.Text(value=noise, description="noise", tooltip="a number, or a multiple of the embedding std like 3s",
                            layout=W.Layout(width="160px"))
        self.run_button = W.Button(description="Run", button_style="primary", icon="play")
        self.plots = W.HBox(layout=W.Layout(flex_flow="row wrap"))
        self.lens_box = W.VBox()
        self.results: dict = {}
        self.figures: dict = {}
        self._views: dict = {}
        self.lens_layout = None
        self._subject_edited = subject is not None
        self.prompt.observe(self._on_prompt, names="value")
        self.subject.observe(self._on_subject, names="value")
        self.run_button.on_click(self._guard(self.run))
        self.children = [
            self.prompt, self.subject, self.tokens,
            W.HBox([self.kind, self.samples, self.noise, self.run_button, self.progress]),
            self.status, self.errors, self.plots, self.lens_box,
        ]
        self._show_tokens()

    # ---------------------------------------------------------------- subject preview
    def _on_prompt(self, change) -> None:
        if not self._subject_edited:
            self._setting_guess = True
            self.subject.value = guess_subject(change["new"])
            self._setting_guess = False
        self._show_tokens()

    def _on_subject(self, change) -> None:
        if not getattr(self, "_setting_guess", False):
            self._subject_edited = True
        self._show_tokens()

    def _show_tokens(self) -> None:
        """Highlight the tokens that will be corrupted (the subject), or say why none can be."""
        try:
            ids, (start, end) = tokenize_with_subject(self.lm.tokenizer, self.prompt.value, self.subject.value,
                                                      self.lm.max_length)
        except FactscopeError as e:
            self.tokens.value = _error_line(str(e))
            return
        spans = []
        for i, t in enumerate(ids):
            text = html.escape(token_label(self.lm.decode(t)))
            style = "background:#ffd54f;font-weight:bold" if start <= i < end else "background:#eee"
            spans.append(f"<span class='fs-token' style='{style};margin:1px;padding:1px 3px;border-radius:3px;"
                         f"font-family:monospace'>{text}</span>")
        self.tokens.value = "tokens (subject highlighted): " + "".join(spans)

    # ---------------------------------------------------------------- running
    def run(self) -> dict:
        """Trace the current prompt for the chosen kind(s), updating the heat maps."""
        kinds = KINDS if self.kind.value == "all" else (self.kind.value,)
        noise = self.noise.value  # "0.1" or "3s": tracer.noise.resolve_noise parses and validates it
        self._busy(f"tracing {', '.join(kinds)} ...", len(kinds))
        results = {}
        for i, kind in enumerate(kinds):
            self.status.value = html.escape(f"tracing {kind} ({i + 1}/{len(kinds)}) ...")
            results.update(self._in_output(lambda: trace_all(  # tqdm's bar shows inside the panel
                self.lm, self.prompt.value, self.subject.value, kinds=(kind,), samples=int(self.samples.value),
                noise=noise, progress=True)))
            self.progress.value = i + 1
        self.show(results)
        return results

    def show(self, results: dict) -> None:
        """Display traces computed elsewhere (``dict kind -> TraceResult`` from ``trace_all``)."""
        results = dict(results)
        if not results:
            return
        self.results = results
        self._show_results()
        r = next(iter(results.values()))
        self._done(f"answer {r.answer!r}: p = {r.high_score:.3f} clean, {r.low_score:.3f} corrupted. "
                   "Click a cell to see that restored run layer by layer.")

    def _show_results(self) -> None:
        for kind, result in self.results.items():
            fig = self.figures.get(kind)
            if fig is None:
                fig = self.figures[kind] = trace_heatmap(result)
                source = fig.select_one({"name": "trace"})
                source.selected.on_change("indices", self._tap_callback(kind))
            else:
                update_trace_heatmap(fig, result)
            if kind not in self._views:
                self._views[kind] = _view(fig)
        self.plots.children = [self._views[k] for k in self.results]

    def _tap_callback(self, kind: str):
        def on_tap(attr, old, new):
            if new:
                source = self.figures[kind].select_one({"name": "trace"})
                i = new[0]
                self._guard(lambda: self.show_cell(kind, source.data["row"][i], source.data["layer"][i]))()

        return on_tap

    def show_cell(self, kind: str, token: int, layer: int):
        """Show the layer-by-layer view of the restored run behind one heat-map cell."""
        result = self.results[kind]
        self.status.value = html.escape(f"decoding the restored run at ({token_label(result.tokens[token])}, layer {layer}) ...")
        lens = restored_lens(self.lm, result, int(token), int(layer))
        if self.lens_layout is None:
            self.lens_layout = lens_figure(lens)
            self.lens_box.children = [_view(self.lens_layout)]
        else:
            update_lens_figure(self.lens_layout, lens)
        self.status.value = html.escape(f"layer-by-layer view of: {lens.label}")
        return lens


class LensPanel(_Panel):
    """Prompt in, layer-by-layer view out.

    ``targets`` (comma-separated words) are followed across layers next to the model's answer.
    With ``ledger`` (an edit ledger applied to the model) the "compare before edits" box adds the
    view of the unedited model, computed with the edits temporarily reverted.
    """

    def __init__(self, model: LanguageModel | str, prompt: str = DEFAULT_PROMPT, targets: str = "Paris, Rome",
                 ledger=None):
        super().__init__(model)
        self.ledger = ledger
        self.prompt = W.Text(value=prompt, description="prompt", layout=W.Layout(width="640px"))
        self.targets = W.Text(value=targets, description="follow", tooltip="comma-separated words",
                              layout=W.Layout(width="420px"))
        self.compare = W.Checkbox(value=False, description="compare with the model before its edits", indent=False,
                                  disabled=ledger is None)
        self.run_button = W.Button(description="Run", button_style="primary", icon="play")
        self.run_button.on_click(self._guard(self.run))
        self.views = W.HBox(layout=W.Layout(flex_flow="row wrap"))
        self.layouts: list = []
        self.children = [self.prompt, W.HBox([self.targets, self.compare, self.run_button, self.progress]),
                         self.status, self.errors, self.views]

    def run(self) -> list:
        """Compute the view(s) for the current prompt; returns the :class:`LensResult` list."""
        targets = _parse_targets(self.targets.value)
        compare = self.compare.value and self.ledger is not None
        self._busy("decoding every layer ...", 2 if compare else 1)
        label = "edited" if self.ledger is not None and self.ledger.records else "model"
        lenses = [logit_lens(self.lm, self.prompt.value, targets=targets, label=label)]
        self.progress.value = 1
        if compare:
            with self.ledger.suspended():
                lenses.insert(0, logit_lens(self.lm, self.prompt.value, targets=targets, label="before edits"))
            self.progress.value = 2
        while len(self.layouts) < len(lenses):
            layout = lens_figure(lenses[len(self.layouts)], width=560)
            self.layouts.append((layout, _view(layout)))
        for (layout, _), lens in zip(self.layouts, lenses):
            update_lens_figure(layout, lens)
        self.views.children = [view for _, view in self.layouts[:len(lenses)]]
        top = lenses[-1]
        self._done(f"answer {top.targets[0]!r} with p = {top.probs[0, -1, -1]:.3f}; "
                   f"it first becomes top-1 at layer {_first_top(top)}")
        return lenses


def _first_top(lens) -> str:
    ranks = lens.ranks[0, -1]
    for layer in range(len(ranks)):
        if all(r == 0 for r in ranks[layer:]):
            return str(layer)
    return "never"


class EditPanel(_Panel):
    """ROME editing in a notebook.

    Controls: subject, prompt template (``{}`` marks the subject), new target, layer (the
    family's default, or the one suggested by ``trace``, an ``mlp`` TraceResult), paraphrases and
    neighbours (one per line). Run computes the edit, applies it to the model and shows the
    before/after checks; Undo reverts the last edit (bit-exact); Save writes the ledger file.
    The ledger table lists the applied edits. ``panel.ledger`` is a :class:`tracer.edit.Ledger`
    (pass it to :class:`LensPanel` to compare before and after).
    """

    def __init__(self, model: LanguageModel | str, subject: str = "The Eiffel Tower",
                 prompt: str = "{} is located in the city of", target: str = "Rome",
                 paraphrases: tuple[str, ...] = ("The Eiffel Tower, the famous landmark, stands in",),
                 neighbours: tuple[str, ...] = ("The Louvre is located in the city of",),
                 trace=None, ledger=None, hparams: dict | None = None):
        super().__init__(model)
        self.ledger = ledger if ledger is not None else Ledger(self.lm)
        self.hparams = dict(hparams or {})
        default_layer = ROMEHyperParams.for_model(self.lm).layer
        self.subject = W.Text(value=subject, description="subject", layout=W.Layout(width="420px"))
        self.prompt = W.Text(value=prompt, description="prompt", tooltip="{} marks where the subject goes",
                             layout=W.Layout(width="640px"))
        self.target = W.Text(value=target, description="new target", layout=W.Layout(width="300px"))
        self.layer = W.BoundedIntText(value=suggest_layer(trace) if trace is not None else default_layer, min=0,
                                      max=self.lm.n_layers - 1, description="layer", layout=W.Layout(width="160px"))
        self.layer_hint = W.HTML(value=(f"suggested by the MLP trace (ROME default {default_layer})" if trace is not None
                                        else f"ROME default for {html.escape(self.lm.layers.family)}"))
        self.paraphrases = W.Textarea(value="\n".join(paraphrases), description="paraphrases",
                                      layout=W.Layout(width="640px", height="50px"))
        self.neighbours = W.Textarea(value="\n".join(neighbours), description="neighbours",
                                     layout=W.Layout(width="640px", height="50px"))
        self.run_button = W.Button(description="Edit", button_style="danger", icon="pencil")
        self.undo_button = W.Button(description="Undo last", icon="undo")
        self.save_path = W.Text(value="edits.safetensors", description="ledger file", layout=W.Layout(width="360px"))
        self.save_button = W.Button(description="Save ledger", icon="save")
        self.run_button.on_click(self._guard(self.run))
        self.undo_button.on_click(self._guard(self.undo))
        self.save_button.on_click(self._guard(lambda: self.save(self.save_path.value)))
        self.ledger_view = W.HTML(value="")
        self.comparison = W.VBox()
        self.layout_ = None
        self.checks: list = []
        self.children = [self.subject, self.prompt, W.HBox([self.target, self.layer, self.layer_hint]),
                         self.paraphrases, self.neighbours,
                         W.HBox([self.run_button, self.undo_button, self.progress]),
                         self.status, self.errors, self.comparison, self.ledger_view,
                         W.HBox([self.save_path, self.save_button])]
        self._show_ledger()

    def run(self):
        """Compute the ROME edit, apply it, and show the checks; returns the ``EditCheck``."""
        request = EditRequest(self.prompt.value, self.subject.value, spaced(self.target.value.strip()))
        hp = ROMEHyperParams.for_model(self.lm, **{**self.hparams, "layer": int(self.layer.value)})
        self._busy(f"computing the edit at layer {hp.layer} (key statistics are cached after the first time) ...", 3)
        record = self._in_output(lambda: rome_edit(self.lm, request, hp))  # tqdm bars inside the panel
        self.progress.value = 1
        self.status.value = "checking prompts before and after ..."
        lines = lambda w: [x.strip() for x in w.value.splitlines() if x.strip()]  # noqa: E731
        check = check_edit(self.lm, record, paraphrases=lines(self.paraphrases), neighbours=lines(self.neighbours))
        self.progress.value = 2
        self.ledger.apply(record)
        self.checks.append(check)
        if self.layout_ is None:
            self.layout_ = edit_comparison(check)
            self.comparison.children = [_view(self.layout_)]
        else:
            update_edit_comparison(self.layout_, check)
        self._show_ledger()
        after = check.prompts[0].after
        self._done(f"edit {record.id} applied: {request.text!r} now -> {after.top1!r} "
                   f"(p new {after.p_new:.2f}, p true {after.p_true:.2f})")
        return check

    def undo(self) -> None:
        """Revert the most recent edit (the weights become bit-for-bit those before it)."""
        if not self.ledger.records:
            raise EditError("there is no edit to undo")
        record = self.ledger.records[-1]
        self.ledger.revert(record)
        self._show_ledger()
        self.status.value = html.escape(f"edit {record.id} reverted; {len(self.ledger.records)} edit(s) remain")

    def save(self, path: str):
        """Write the ledger (safetensors + JSON metadata); re-apply it with ``Ledger.load``."""
        if not self.ledger.records:
            raise EditError("the ledger is empty; make an edit first")
        written = self.ledger.save(path)
        self.status.value = html.escape(f"ledger with {len(self.ledger.records)} edit(s) written to {written}")
        return written

    def _show_ledger(self) -> None:
        records = self.ledger.records
        if not records:
            self.ledger_view.value = "<i>ledger: no edits applied</i>"
            return
        rows = "".join(_ledger_row(r) for r in records)
        self.ledger_view.value = ("<b>ledger</b><table style='border-collapse:collapse' border=1 cellpadding=3>"
                                  "<tr><th>id</th><th>prompt</th><th>edit</th><th>layer</th><th>p new after</th></tr>"
                                  f"{rows}</table>")


def _ledger_row(r) -> str:
    """One table row of the ledger view: a ROME edit, or a MEMIT batch (its first request shown)."""
    s = r.summary()
    prompt = ("MEMIT: " if s["method"] == "MEMIT" else "") + s["prompt"]
    p_new = "\u2013" if s["p_new_after"] is None else f"{s['p_new_after']:.2f}"
    return "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (s["id"], prompt, s["change"], s["layers"], p_new)) + "</tr>"


def show(obj) -> None:
    """Display a Bokeh figure or layout in the notebook (``bokeh.plotting.show``), its texts literal."""
    bokeh_show(literal(obj))
