"""Notebook panels: ipywidgets controls around the figures of :mod:`widgets.figures`.

    from widgets import TracePanel, LensPanel, EditPanel
    trace = TracePanel(lm)                 # prompt, subject, kind, samples, noise -> heat maps; click a cell
    edit = EditPanel(lm, trace=trace)      # ROME at the trace's strongest MLP layer; the edited model's
                                           # trace next to the original's; Undo; Save ledger
    LensPanel(lm, ledger=edit.ledger)      # layer-by-layer view, before and after the edits

**Working together.** An :class:`EditPanel` given a :class:`TracePanel` follows it: each trace the
trace panel shows sets the edit's prompt and subject, and its layer to the strongest MLP layer at
the last subject token (:func:`tracer.trace_result.suggest_layer`). After an edit it traces the
edited model with the original trace's settings (same noise draws) and shows it next to the
original with their difference. Clicking a heat-map cell opens that restored run layer by layer.

**Long work** started by a button (Run, Edit, a clicked cell) runs in a thread of its own, so the
notebook stays responsive: the progress bar follows the engine's steps and Cancel stops the work at
its next step (:func:`tracer.progress.watching`). A cancelled edit leaves the model as it was: the
edit enters the ledger only once everything else is done, and the edited trace, which needs it
applied, reverts it when cancelled. ``panel.run()`` called from code works in the caller's thread
and returns the results; ``panel.wait()`` waits for a button's work.

Bokeh figures sit inside the widget layout through jupyter_bokeh's ``BokehModel``. All work is
done by :mod:`tracer`; the panels only call it and update the figures' data sources in place.
Errors appear inside the panel: a factscope error as one line, anything else with its traceback.
:func:`setup_notebook` loads BokehJS from the installed bokeh package (no CDN); a panel calls it
if the notebook has not.
"""
from __future__ import annotations

import html
import logging
import threading
import time
import traceback
from typing import Callable, Mapping

import ipywidgets as W
import torch
from bokeh.io import output_notebook
from bokeh.io.state import curstate
from bokeh.plotting import show as bokeh_show
from bokeh.resources import INLINE
from jupyter_bokeh import BokehModel

from tracer.edit import EditRequest, Ledger, ROMEHyperParams, check_edit, rome_edit
from tracer.edit.ledger import revert_keeping
from tracer.errors import Cancelled, EditError, FactscopeError
from tracer.lens import logit_lens, restored_lens
from tracer.models import LanguageModel, as_model
from tracer.progress import Step, watching
from tracer.subject import guess_subject, tokenize_with_subject
from tracer.targets import spaced
from tracer.trace import trace_all
from tracer.trace_result import KINDS, TraceResult, suggest_layer

from .figures import (edit_comparison, lens_figure, token_label, trace_comparison, trace_heatmap,
                      update_edit_comparison, update_lens_figure, update_trace_comparison, update_trace_heatmap)
from .text import literal

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "The Eiffel Tower is located in the city of"
#: seconds between two updates of a progress bar (the engine may report hundreds of steps a second)
STEP_INTERVAL = 0.2


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
    """Shared plumbing: status line, error area, progress bar, Cancel, and work in a thread."""

    def __init__(self, model: LanguageModel | str, **kwargs):
        super().__init__(**kwargs)
        if not curstate().notebook:  # BokehJS must be in the page before a BokehModel renders
            setup_notebook()
        self.lm = as_model(model)
        self.add_class("fs-panel")
        self.status = W.HTML(value="")
        self.status.add_class("fs-status")
        self.errors = W.Output(layout=W.Layout(max_height="300px", overflow="auto"))
        self.progress = W.IntProgress(value=0, min=0, max=1, description="",
                                      layout=W.Layout(width="240px", visibility="hidden"))
        self.step = W.HTML(value="")
        self.cancel_button = W.Button(description="Cancel", icon="stop", tooltip="stop after the current step",
                                      layout=W.Layout(width="100px", visibility="hidden"))
        self.cancel_button.on_click(lambda _button: self.cancel())
        #: buttons run their work in a thread (True) or in the callback itself (False)
        self.background = True
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._shown_at = 0.0

    def _buttons(self) -> list[W.Button]:
        """The buttons that start work, disabled while the panel works."""
        return []

    @property
    def busy(self) -> bool:
        """Whether work started by a button is running."""
        return self._worker is not None and self._worker.is_alive()

    def cancel(self) -> None:
        """Stop the running work at its next step (the model is left as it was before it)."""
        if self.busy:
            self._stop.set()
            self.status.value = html.escape("cancelling after the current step ...")

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for work started by a button; True when none is running any more."""
        worker = self._worker
        if worker is not None:
            worker.join(timeout)
        return not self.busy

    def _action(self, fn: Callable[[], object]) -> Callable[..., None]:
        """A button callback running ``fn`` as panel work."""
        return lambda *_args: self._start(fn)

    def _start(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` (in a thread when :attr:`background`); its errors are shown in the panel."""
        if self.busy:
            self.status.value = _error_line("still working: wait for it, or press Cancel")
            return
        self._stop.clear()
        self.errors.clear_output()
        self._working(True)
        if self.background:
            self._worker = threading.Thread(target=self._work, args=(fn,), daemon=True,
                                            name=f"factscope-{type(self).__name__}")
            self._worker.start()
        else:
            self._work(fn)

    def _work(self, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Cancelled:
            self.status.value = html.escape("cancelled; the model is as it was before")
        except FactscopeError as e:
            self.status.value = _error_line(str(e))
        except Exception as e:  # noqa: BLE001 (shown in the panel, with its traceback)
            self.status.value = _error_line(f"{type(e).__name__}: {e}")
            self.errors.append_stderr(traceback.format_exc())
        finally:
            self._working(False)

    def _working(self, on: bool) -> None:
        for button in self._buttons():
            button.disabled = on
        self.cancel_button.layout.visibility = "visible" if on else "hidden"

    def _watched(self, fn: Callable[[], object]):
        """``fn()`` with the engine's steps shown on the progress bar, stopped by Cancel."""
        self.progress.max, self.progress.value = 1, 0
        self.progress.layout.visibility = "visible"
        try:
            with watching(self.lm, on_step=self._on_step, stop=self._stop):
                return fn()
        finally:
            self.progress.layout.visibility = "hidden"
            self.step.value = ""

    def _on_step(self, step: Step) -> None:
        now = time.monotonic()
        if step.n != step.total and now - self._shown_at < STEP_INTERVAL:
            return
        self._shown_at = now
        if step.total:
            self.progress.max = max(1, int(step.total))
            self.progress.value = min(int(step.n), self.progress.max)
        of = f" of {step.total}" if step.total else ""
        self.step.value = html.escape(f"{step.desc}: {step.n}{of}")

    def _stage(self, text: str, i: int, n: int) -> None:
        """Say which stage of ``n`` runs; stop here if Cancel was pressed."""
        if self._stop.is_set():
            raise Cancelled("cancelled; nothing was changed")
        self.status.value = html.escape(f"step {i} of {n}: {text} ..." if n > 1 else f"{text} ...")

    def _done(self, text: str) -> None:
        self.progress.value = self.progress.max
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
    button does and returns the results (``dict kind -> TraceResult``); :meth:`on_results`
    registers a function called with every set of traces the panel shows (an
    :class:`EditPanel` follows the panel that way).
    """

    def __init__(self, model: LanguageModel | str, prompt: str = DEFAULT_PROMPT, subject: str | None = None,
                 kind: str = "all", samples: int = 10, noise: str = "3s"):
        super().__init__(model)
        self.add_class("fs-trace-panel")
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
        self._listeners: list[Callable[[dict], None]] = []
        self.lens_layout = None
        self._subject_edited = subject is not None
        self.prompt.observe(self._on_prompt, names="value")
        self.subject.observe(self._on_subject, names="value")
        self.run_button.on_click(self._action(self.run))
        self.children = [
            self.prompt, self.subject, self.tokens,
            W.HBox([self.kind, self.samples, self.noise, self.run_button, self.cancel_button]),
            W.HBox([self.progress, self.step]), self.status, self.errors, self.plots, self.lens_box,
        ]
        self._show_tokens()

    def _buttons(self) -> list[W.Button]:
        return [self.run_button]

    def on_results(self, fn: Callable[[dict], None]) -> None:
        """Call ``fn(results)`` (``dict kind -> TraceResult``) whenever the panel shows traces."""
        self._listeners.append(fn)

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
        return self._watched(self._trace)

    def _trace(self) -> dict:
        kinds = KINDS if self.kind.value == "all" else (self.kind.value,)
        noise = self.noise.value  # "0.1" or "3s": tracer.noise.resolve_noise parses and validates it
        results = {}
        for i, kind in enumerate(kinds):
            self._stage(f"tracing {kind}", i + 1, len(kinds))
            results.update(trace_all(self.lm, self.prompt.value, self.subject.value, kinds=(kind,),
                                     samples=int(self.samples.value), noise=noise, progress=False))
        self.show(results)
        return results

    def show(self, results: Mapping[str, TraceResult]) -> None:
        """Display traces computed elsewhere (``dict kind -> TraceResult`` from ``trace_all``)."""
        results = dict(results)
        if not results:
            return
        self.results = results
        self._show_results()
        r = next(iter(results.values()))
        self._done(f"answer {r.answer!r}: p = {r.high_score:.3f} clean, {r.low_score:.3f} corrupted. "
                   "Click a cell to see that restored run layer by layer.")
        for fn in self._listeners:
            fn(results)

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
                token, layer = source.data["row"][i], source.data["layer"][i]
                self._start(lambda: self.show_cell(kind, token, layer))

        return on_tap

    def show_cell(self, kind: str, token: int, layer: int):
        """Show the layer-by-layer view of the restored run behind one heat-map cell."""
        result = self.results[kind]
        self.status.value = html.escape(f"decoding the restored run at ({token_label(result.tokens[token])}, layer {layer}) ...")
        lens = self._watched(lambda: restored_lens(self.lm, result, int(token), int(layer)))
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
        self.add_class("fs-lens-panel")
        self.ledger = ledger
        self.prompt = W.Text(value=prompt, description="prompt", layout=W.Layout(width="640px"))
        self.targets = W.Text(value=targets, description="follow", tooltip="comma-separated words",
                              layout=W.Layout(width="420px"))
        self.compare = W.Checkbox(value=False, description="compare with the model before its edits", indent=False,
                                  disabled=ledger is None)
        self.run_button = W.Button(description="Run", button_style="primary", icon="play")
        self.run_button.on_click(self._action(self.run))
        self.views = W.HBox(layout=W.Layout(flex_flow="row wrap"))
        self.layouts: list = []
        self.children = [self.prompt, W.HBox([self.targets, self.compare, self.run_button, self.cancel_button]),
                         W.HBox([self.progress, self.step]), self.status, self.errors, self.views]

    def _buttons(self) -> list[W.Button]:
        return [self.run_button]

    def run(self) -> list:
        """Compute the view(s) for the current prompt; returns the :class:`LensResult` list."""
        return self._watched(self._lens)

    def _lens(self) -> list:
        targets = _parse_targets(self.targets.value)
        compare = self.compare.value and self.ledger is not None
        label = "edited" if self.ledger is not None and self.ledger.records else "model"
        self._stage("decoding every layer", 1, 2 if compare else 1)
        lenses = [logit_lens(self.lm, self.prompt.value, targets=targets, label=label)]
        if compare:
            self._stage("decoding every layer before the edits", 2, 2)
            with self.ledger.suspended():
                lenses.insert(0, logit_lens(self.lm, self.prompt.value, targets=targets, label="before edits"))
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


def template_of(prompt: str, subject: str) -> str:
    """The edit prompt of a traced prompt: its first occurrence of ``subject`` replaced by ``{}``
    (the prompt itself when the subject does not occur; :class:`EditRequest` then says so)."""
    return prompt.replace(subject, "{}", 1) if subject and subject in prompt else prompt


class EditPanel(_Panel):
    """ROME editing in a notebook.

    Controls: subject, prompt template (``{}`` marks the subject), new target, layer, paraphrases
    and neighbours (one per line), "trace the edited model". Edit computes the edit, checks it,
    applies it to the model and shows the before/after checks (and, when asked, the edited model's
    traces next to the original's); Undo reverts the last edit (bit-exact); Save writes the ledger
    file. The ledger table lists the applied edits. ``panel.ledger`` is a :class:`tracer.edit.Ledger`
    (pass it to :class:`LensPanel` to compare before and after).

    ``trace``: a :class:`TracePanel` to follow (its prompt and subject, its strongest MLP layer as
    the layer, its traces as the originals; the edited model is traced by default), or an ``mlp``
    :class:`TraceResult` whose strongest layer is the default; without it, the family's ROME
    layer. Without a trace panel, "trace the edited model" traces MLP and the edit's prompt
    with ``trace_settings`` (``samples``, ``noise``; default 3 samples, "3s").
    """

    def __init__(self, model: LanguageModel | str, subject: str | None = None, prompt: str | None = None,
                 target: str = "Rome",
                 paraphrases: tuple[str, ...] = ("The Eiffel Tower, the famous landmark, stands in",),
                 neighbours: tuple[str, ...] = ("The Louvre is located in the city of",),
                 trace: "TracePanel | TraceResult | None" = None, ledger=None, hparams: dict | None = None,
                 trace_edited: bool | None = None, trace_settings: dict | None = None):
        super().__init__(model)
        self.add_class("fs-edit-panel")
        self.ledger = ledger if ledger is not None else Ledger(self.lm)
        self.hparams = dict(hparams or {})
        self.trace_panel = trace if isinstance(trace, TracePanel) else None
        self.trace_settings = {"samples": 3, "noise": "3s", **(trace_settings or {})}
        self.default_layer = ROMEHyperParams.for_model(self.lm).layer
        if self.trace_panel is not None:
            subject = subject if subject is not None else self.trace_panel.subject.value
            prompt = prompt if prompt is not None else template_of(self.trace_panel.prompt.value, subject)
        subject = subject if subject is not None else "The Eiffel Tower"
        self.subject = W.Text(value=subject, description="subject", layout=W.Layout(width="420px"))
        self.prompt = W.Text(value=prompt if prompt is not None else "{} is located in the city of", description="prompt",
                             tooltip="{} marks where the subject goes", layout=W.Layout(width="640px"))
        self.target = W.Text(value=target, description="new target", layout=W.Layout(width="300px"))
        self.layer = W.BoundedIntText(value=self.default_layer, min=0, max=self.lm.n_layers - 1, description="layer",
                                      layout=W.Layout(width="160px"))
        self.layer_hint = W.HTML(value=f"ROME default for {html.escape(self.lm.layers.family)}")
        self.paraphrases = W.Textarea(value="\n".join(paraphrases), description="paraphrases",
                                      layout=W.Layout(width="640px", height="50px"))
        self.neighbours = W.Textarea(value="\n".join(neighbours), description="neighbours",
                                     layout=W.Layout(width="640px", height="50px"))
        self.trace_edited = W.Checkbox(value=self.trace_panel is not None if trace_edited is None else trace_edited,
                                       description="trace the edited model", indent=False)
        self.run_button = W.Button(description="Edit", button_style="danger", icon="pencil")
        self.undo_button = W.Button(description="Undo last", icon="undo")
        self.save_path = W.Text(value="edits.safetensors", description="ledger file", layout=W.Layout(width="360px"))
        self.save_button = W.Button(description="Save ledger", icon="save")
        self.run_button.on_click(self._action(self.run))
        self.undo_button.on_click(self._action(self.undo))
        self.save_button.on_click(self._action(lambda: self.save(self.save_path.value)))
        self.ledger_view = W.HTML(value="")
        self.comparison = W.VBox()
        self.edited_box = W.VBox()
        self.layout_ = None
        self.checks: list = []
        self.edited_traces: dict = {}
        self.comparisons: dict = {}  # kind -> the row of original | edited | difference (widgets.figures.trace_comparison)
        self._comparison_views: dict = {}
        self._edited_for: str | None = None
        self.children = [self.subject, self.prompt, W.HBox([self.target, self.layer, self.layer_hint]),
                         self.paraphrases, self.neighbours,
                         W.HBox([self.run_button, self.undo_button, self.trace_edited, self.cancel_button]),
                         W.HBox([self.progress, self.step]), self.status, self.errors, self.comparison,
                         self.edited_box, self.ledger_view, W.HBox([self.save_path, self.save_button])]
        if isinstance(trace, TraceResult):
            self._follow_layer(trace)
        elif self.trace_panel is not None:
            if "mlp" in self.trace_panel.results:
                self._follow_layer(self.trace_panel.results["mlp"])
            self.trace_panel.on_results(self.follow)
        self._show_ledger()

    def _buttons(self) -> list[W.Button]:
        return [self.run_button, self.undo_button, self.save_button]

    # ---------------------------------------------------------------- following a trace
    def follow(self, results: Mapping[str, TraceResult]) -> None:
        """Take the edit's prompt and subject from traces, and its layer from their MLP trace."""
        first = next(iter(results.values()), None)
        if first is None:
            return
        self.subject.value = first.subject
        self.prompt.value = template_of(first.prompt, first.subject)
        if "mlp" in results:
            self._follow_layer(results["mlp"])

    def _follow_layer(self, mlp: TraceResult) -> None:
        layer = suggest_layer(mlp)
        self.layer.value = layer
        token = token_label(mlp.tokens[mlp.subject_span[1] - 1])
        self.layer_hint.value = html.escape(f"the strongest MLP layer of the trace at {token!r} (ROME default "
                                            f"{self.default_layer})")

    # ---------------------------------------------------------------- editing
    def run(self):
        """Compute the ROME edit, check it, apply it (and trace the edited model when asked);
        returns the ``EditCheck``. Cancelled or failed, the model and the ledger are unchanged."""
        return self._watched(self._edit)

    def _edit(self):
        request = EditRequest(self.prompt.value, self.subject.value, spaced(self.target.value.strip()))
        hp = ROMEHyperParams.for_model(self.lm, **{**self.hparams, "layer": int(self.layer.value)})
        traced = self.trace_edited.value
        originals = self._original_traces(request) if traced else {}
        n = 3 + traced + (traced and not originals)
        self._stage(f"computing the edit at layer {hp.layer} (key statistics are cached after the first time)", 1, n)
        record = rome_edit(self.lm, request, hp, progress=False)
        self._stage("checking prompts before and after", 2, n)
        lines = lambda w: [x.strip() for x in w.value.splitlines() if x.strip()]  # noqa: E731
        check = check_edit(self.lm, record, paraphrases=lines(self.paraphrases), neighbours=lines(self.neighbours))
        if traced and not originals:
            self._stage("tracing the original model", 3, n)
            originals = self._trace(request, None)
        edited = {}
        self._stage("applying the edit" + (" and tracing the edited model" if traced else ""), n, n)
        self.ledger.apply(record)
        if traced:
            try:
                edited = self._trace(request, originals)
            except BaseException as e:  # cancelled or failed: the edit leaves the model again
                revert_keeping(e, lambda: self.ledger.revert(record))
                raise
        self.checks.append(check)
        self._show_edit(check, originals, edited, record.id)
        after = check.prompts[0].after
        self._done(f"edit {record.id} applied: {request.text!r} now -> {after.top1!r} "
                   f"(p new {after.p_new:.2f}, p true {after.p_true:.2f})")
        return check

    def _original_traces(self, request: EditRequest) -> dict:
        """The linked trace panel's traces when they are of the edit's prompt and subject."""
        results = self.trace_panel.results if self.trace_panel is not None else {}
        return {k: r for k, r in results.items() if r.prompt == request.text and r.subject == request.subject}

    def _trace(self, request: EditRequest, originals: dict | None) -> dict:
        """Traces of ``request``'s prompt on the model as it is now: with the settings (and so the
        noise draws) of ``originals``, or for the original model with the panel's settings."""
        if originals:
            return {kind: trace_all(self.lm, request.text, request.subject, kinds=(kind,), samples=o.samples,
                                    noise=o.noise, window=o.window, seed=o.seed, progress=False)[kind] for kind, o in originals.items()}
        panel = self.trace_panel
        if panel is not None:
            kinds = KINDS if panel.kind.value == "all" else (panel.kind.value,)
            settings = {"samples": int(panel.samples.value), "noise": panel.noise.value}
        else:
            kinds, settings = ("mlp",), self.trace_settings
        return trace_all(self.lm, request.text, request.subject, kinds=kinds, progress=False, **settings)

    def _show_edit(self, check, originals: dict, edited: dict, record_id: str) -> None:
        if self.layout_ is None:
            self.layout_ = edit_comparison(check)
            self.comparison.children = [_view(self.layout_)]
        else:
            update_edit_comparison(self.layout_, check)
        self.edited_traces = edited
        views = []
        for kind, after in edited.items():
            if kind in self.comparisons:
                update_trace_comparison(self.comparisons[kind], originals[kind], after)
            else:
                self.comparisons[kind] = trace_comparison(originals[kind], after)
                self._comparison_views[kind] = _view(self.comparisons[kind])
            views.append(self._comparison_views[kind])
        self.edited_box.children = views
        self._edited_for = record_id if edited else None
        self._show_ledger()

    def undo(self) -> None:
        """Revert the most recent edit (the weights become bit-for-bit those before it)."""
        if not self.ledger.records:
            raise EditError("there is no edit to undo")
        record = self.ledger.records[-1]
        self.ledger.revert(record)
        if self._edited_for == record.id:  # the edited traces shown were of this edit
            self.edited_box.children, self.edited_traces, self._edited_for = [], {}, None
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
