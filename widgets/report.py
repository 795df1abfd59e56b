"""Standalone HTML reports: every script and datum inlined, so the file opens offline.

    save_report("report.html", model="smollm2-135m", traces=traces, edit_checks=checks,
                lens=[lens_before, lens_after], settings={"samples": 10})

The page holds the traces (and the traces of the edited model), the edit's before/after checks,
the layer-by-layer view, and a header with the model name, settings, library versions and date.
Bokeh's JavaScript comes from ``bokeh.resources.INLINE``; nothing is loaded from the network.
Every text on the page is literal (:mod:`widgets.text`): a prompt such as ``$$\\href{…}$$`` shows as
typed, never as TeX or HTML.
"""
from __future__ import annotations

import datetime as _dt
import html
import importlib.metadata
import platform
from pathlib import Path
from typing import Mapping, Sequence

from bokeh.embed import file_html
from bokeh.layouts import column
from bokeh.resources import INLINE

from tracer.lens import LensResult
from tracer.files import write_text_atomic
from tracer.trace_result import TraceResult

from .figures import TABLE_CSS, edit_comparison, lens_comparison, lens_figure, trace_grid
from .text import html_div, literal, literal_models

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


def _kv_table(items: Mapping[str, object]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in items.items())
    return f"<table class='fs-table'>{rows}</table>"


def _heading(text: str, name: str):
    return html_div(f"<h2 style='font:bold 18px sans-serif;margin:18px 0 4px'>{html.escape(text)}</h2>", name=name)


@literal_models
def build_report(
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
):
    """The report's Bokeh layout (used by :func:`save_report`; testable without a file)."""
    date = date or _dt.datetime.now().astimezone()
    meta = {"model": model, "date": date.isoformat(timespec="seconds"), **library_versions()}
    parts = [
        html_div(f"{TABLE_CSS}<h1 style='font:bold 22px sans-serif'>{html.escape(title)}</h1>"
                 f"{_kv_table(meta)}", name="report_header"),
    ]
    if settings:
        parts += [_heading("Settings", "settings_heading"), html_div(TABLE_CSS + _kv_table(settings), name="settings")]
    if traces:
        parts += [_heading("Causal traces", "traces_heading"), trace_grid(traces)]
    if edit_checks:
        parts += [_heading(f"Edit: {true_target.strip()} \u2192 {new_target.strip()}", "edit_heading"),
                  edit_comparison(edit_checks, new_target=new_target, true_target=true_target, generations=generations)]
    if edited_traces:
        parts += [_heading("Causal traces of the edited model", "edited_heading"), trace_grid(edited_traces)]
    if lens:
        parts += [_heading("Layer by layer (logit lens)", "lens_heading")]
        parts += [lens_figure(item) for item in lens]
        if len(lens) > 1:
            parts.append(lens_comparison(lens, target=0))
    return column(*parts, name="report")


def report_html(**kwargs) -> str:
    """The report as one HTML string with Bokeh's JavaScript and CSS inlined."""
    layout = literal(build_report(**kwargs))  # again here: whatever a part forgot, the page shows literally
    return file_html(layout, resources=INLINE, title=kwargs.get("title", "factscope report"))


def save_report(path: str | Path, **kwargs) -> Path:
    """Write the report (see :func:`build_report` for the arguments) to ``path``; returns it."""
    return write_text_atomic(path, report_html(**kwargs))
