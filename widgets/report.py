"""Standalone HTML reports: every script and datum inlined, so the file opens offline.

    save_report("report.html", model="smollm2-135m", traces=traces, edit_checks=checks,
                lens=[lens_before, lens_after], settings={"samples": 10})

The page (:class:`widgets.page.Page`) speaks first: a summary computed from the results
(:mod:`widgets.summary`: verdict, the strongest cell per kind with its token and layer, the edit's
results before -> after), then the traces, the edit, the edited model's traces beside the
original's with their difference, the layer-by-layer view, each with two lines on how to read
it, and last the provenance (model, date, settings, library versions).
Bokeh's JavaScript comes from ``bokeh.resources.INLINE``; nothing is loaded from the network.
Every text on the page is literal (:mod:`widgets.text`): a prompt such as ``$$\\href{…}$$`` shows as
typed, never as TeX or HTML.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
from pathlib import Path
from typing import Mapping, Sequence

from tracer.lens import LensResult
from tracer.files import write_text_atomic
from tracer.trace_result import TraceResult

from .figures import edit_comparison, lens_comparison, lens_figure, trace_comparison, trace_heatmap
from .page import Figure, Page, Row, Section
from .summary import report_summary
from .text import html_div

VERSIONED = ("factscope", "torch", "transformers", "bokeh", "numpy")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a report depends on (``"not installed"`` if absent)."""
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


#: the two lines a classroom reads before each figure
HOW_TO_READ = {
    "traces": "Each row is a token of the prompt (the subject is boxed and marked *), each column a layer. The subject "
              "was blurred with noise, then one cell of the clean run was put back: the darker the cell, the more of "
              "the answer's probability that one cell brings back, so dark cells show where the fact is recalled.",
    "edit": "For each checked prompt, the bars give the probability of the new answer (vermillion) and of the true "
            "answer (blue), light and hatched before the edit, solid after. A good edit raises the new answer on the "
            "edited prompt and its paraphrases and leaves neighbouring facts on their true answer.",
    "edited": "Each row of three lines up one kind of trace: the original model (left), the edited model (middle, "
              "scoring its new answer) and their difference (right), cell by cell: teal where the edited model "
              "relies more on a cell than the original did, brown where less, white where nothing changed.",
    "lens": "The logit lens reads each layer's hidden state as if it were the model's output. The first chart "
            "follows the new answer (vermillion) and the true answer (blue) layer by layer at the last token, dashed "
            "before the edit and solid after; the grids show the top token at every position and layer.",
}


def _items(results) -> list:
    return list(results.values()) if isinstance(results, Mapping) else list(results)


def _edit_section(edit_checks, generations, new_target: str, true_target: str) -> Section:
    layout = edit_comparison(edit_checks, new_target=new_target, true_target=true_target, generations=generations)
    figs = [Figure(layout.select_one({"name": n})) for n in ("edit_new", "edit_true")]
    blocks = [Row(figs, 2), layout.select_one({"name": "edit_table"})]
    gens = layout.select_one({"name": "edit_generations"})
    if gens.text:
        blocks.append(gens)
    return Section(f"Edit: {true_target.strip()} \u2192 {new_target.strip()}", "edit", blocks, HOW_TO_READ["edit"])


def _edited_section(traces, edited_traces) -> Section:
    originals = {r.kind: r for r in _items(traces)}
    blocks = []
    for r in _items(edited_traces):
        o = originals.get(r.kind)
        if o is not None and o.scores.shape == r.scores.shape and list(o.tokens) == list(r.tokens):
            blocks.append(Row([Figure(f) for f in trace_comparison(o, r).children], 3))
        else:
            blocks.append(Row([Figure(trace_heatmap(r))], 3))
    return Section("Causal traces of the edited model", "edited", blocks, HOW_TO_READ["edited"])


def _lens_section(lens: Sequence[LensResult], new_target: str, true_target: str) -> Section:
    targets = dict(new_target=new_target, true_target=true_target)
    blocks = []
    if len(lens) > 1:
        blocks.append(Figure(lens_comparison(lens, target=None, **targets)))
    for item in lens:
        layout = lens_figure(item, **targets)
        for child in layout.children:
            child.min_width = 120 + 24 * item.n_layers  # room for each cell's top token; scrolls in its card
        blocks.append(Figure(layout, wide=True))
    return Section("Layer by layer (logit lens)", "lens", blocks, HOW_TO_READ["lens"])


def report_page(
    *,
    model: str,
    traces: Mapping[str, TraceResult] | Sequence[TraceResult] = (),
    edited_traces: Mapping[str, TraceResult] | Sequence[TraceResult] = (),
    edit_checks: Sequence[Mapping] = (),
    generations: Sequence[Mapping] = (),
    new_target: str = "new",
    true_target: str = "true",
    lens: Sequence[LensResult] = (),
    settings: Mapping[str, object] | None = None,
    title: str = "factscope report",
    date: _dt.datetime | None = None,
) -> Page:
    """The report as a :class:`widgets.page.Page`: the summary (verdict, strongest cell per kind
    with its token and layer, the edit's results before -> after), then traces, edit, the edited
    model's traces beside the original's with their difference, the layer-by-layer view, and the
    provenance (model, date, settings, library versions)."""
    date = date or _dt.datetime.now().astimezone()
    sections = []
    if traces:
        sections.append(Section("Causal traces: where the fact is recalled", "traces",
                                [Row([Figure(trace_heatmap(r)) for r in _items(traces)], 3)], HOW_TO_READ["traces"]))
    if edit_checks:
        sections.append(_edit_section(edit_checks, generations, new_target, true_target))
    if edited_traces:
        sections.append(_edited_section(traces, edited_traces))
    if lens:
        sections.append(_lens_section(lens, new_target, true_target))
    summary = report_summary(traces, edit_checks, new_target=new_target, true_target=true_target)
    provenance = {"Report": {"model": model, "date": date.isoformat(timespec="seconds")}}
    if settings:
        provenance["Settings"] = dict(settings)
    provenance["Versions"] = library_versions()
    return Page(title=title, summary=html_div(summary, name="summary"), sections=sections, provenance=provenance,
                subtitle=f"{model} \u00b7 {date.strftime('%Y-%m-%d %H:%M')}", name="report")


def build_report(**kwargs):
    """The report's Bokeh layout (:meth:`Page.layout` of :func:`report_page`; testable without a file)."""
    return report_page(**kwargs).layout()


def report_html(**kwargs) -> str:
    """The report as one HTML string with Bokeh's JavaScript and CSS inlined (:meth:`Page.html`)."""
    return report_page(**kwargs).html()


def save_report(path: str | Path, **kwargs) -> Path:
    """Write the report (see :func:`report_page` for the arguments) to ``path``; returns it."""
    return write_text_atomic(path, report_html(**kwargs))
