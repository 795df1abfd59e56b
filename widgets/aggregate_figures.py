"""Figures of dataset-level average causal effects (:class:`tracer.aggregate.EffectAverages`).

    fig = average_effect_figure(averages["mlp"])        # one line + CI band per token bucket
    row_ = average_effects_row(averages)                # hidden / MLP / attention side by side
    sev = severed_comparison(averages)                  # the paper's Figure 7 at one bucket
    write_html(averages, "averages.html")               # standalone, all JavaScript inlined

Pure builders: results in, Bokeh models out. The page is a :class:`widgets.page.Page` like the
trace report (summary first, figures with how to read them, provenance last), inlines Bokeh's
JavaScript (no CDN; works offline) and shows every text literally (:mod:`widgets.text`: model
names, kinds and settings are never TeX or HTML). Colours (:mod:`widgets.palette`): a line's
colour is its token bucket in every chart; in the severed comparison the line style is the path cut.
Each line's data source is named ``aie-<kind>-<bucket>`` (``sev-<kind>`` in the severed comparison)
so tests and panels can find it.
"""
from __future__ import annotations

import datetime as _dt
import html
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from bokeh.layouts import row
from bokeh.models import ColumnDataSource, HoverTool, Range1d
from bokeh.plotting import figure

from tracer.aggregate import BUCKET_LABELS, BUCKETS, EffectAverages
from tracer.files import write_text_atomic

from .figures import TABLE_CSS
from .page import Figure, Page, Row, Section
from .palette import BUCKET_COLORS, SEVERED_DASH
from .report import library_versions
from .text import html_div, literal_models

KIND_TITLES = {"hidden": "a single hidden vector", "mlp": "a run of {w} MLP lookups",
               "attn": "a run of {w} attention modules", "hidden-severed-mlp": "a hidden vector, MLP path severed",
               "hidden-severed-attn": "a hidden vector, attention path severed"}
HOW_TO_READ = {
    "effects": "Each line is one position in the prompt (its colour, the same in every chart), across layers: how "
               "much restoring that position's hidden state, MLP or attention brings the answer back, averaged over "
               "the facts, with a shaded 95% band. A peak at the last subject token in middle layers of the MLP chart "
               "is where facts are recalled.",
    "severed": "The same restoration of one hidden state, with the later MLP (dashed) or attention (dotted) path cut "
               "off. When cutting the MLP path removes the effect in middle layers, the MLP is what carries the fact.",
}


def _line_data(avg: EffectAverages, bucket: str) -> dict[str, list]:
    i = avg.buckets.index(bucket)
    return {"layer": list(range(avg.n_layers)), "aie": avg.indirect[i].tolist(),
            "lo": avg.indirect_ci[0, i].tolist(), "hi": avg.indirect_ci[1, i].tolist(),
            "bucket": [BUCKET_LABELS[bucket]] * avg.n_layers, "cells": [int(avg.cells[i])] * avg.n_layers}


def _title(avg: EffectAverages) -> str:
    what = KIND_TITLES[avg.kind].format(w=avg.window) if avg.kind in KIND_TITLES else avg.kind  # a name, not a format
    return f"Average indirect effect of {what} ({avg.n_facts} facts)"


def _y_range(averages: Sequence[EffectAverages]) -> Range1d:
    values = np.concatenate([np.ravel(a.indirect_ci) for a in averages] + [np.ravel(a.indirect) for a in averages])
    values = values[np.isfinite(values)]
    lo, hi = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
    pad = 0.05 * (hi - lo or 1.0)
    return Range1d(min(lo, 0.0) - pad, hi + pad)


@literal_models
def average_effect_figure(avg: EffectAverages, *, buckets: Sequence[str] = BUCKETS, width: int = 430,
                          height: int = 300, y_range: Range1d | None = None, legend: bool = True) -> figure:
    """Average indirect effect per layer, one line per bucket, shaded bootstrap CI."""
    fig = figure(title=_title(avg), width=width, height=height, x_axis_label="layer",
                 y_axis_label="average indirect effect on p(answer)", y_range=y_range or _y_range([avg]),
                 tools="pan,box_zoom,wheel_zoom,reset,save", name=f"aie-{avg.kind}")
    for bucket in buckets:
        i = avg.buckets.index(bucket)
        if avg.cells[i] == 0:
            continue
        src = ColumnDataSource(_line_data(avg, bucket), name=f"aie-{avg.kind}-{bucket}")
        color = BUCKET_COLORS[bucket]
        fig.varea(x="layer", y1="lo", y2="hi", source=src, fill_color=color, fill_alpha=0.2)
        kw = {"legend_label": BUCKET_LABELS[bucket]} if legend else {}
        fig.line(x="layer", y="aie", source=src, line_color=color, line_width=2, **kw)
    fig.add_tools(HoverTool(tooltips=[("bucket", "@bucket"), ("layer", "@layer"), ("AIE", "@aie{0.000}"),
                                      (f"{avg.confidence:.0%} CI", "@lo{0.000} .. @hi{0.000}"), ("cells", "@cells")]))
    if legend and fig.legend:
        fig.legend.location = "top_right"
        fig.legend.label_text_font_size = "9px"
        fig.legend.click_policy = "hide"
    return fig


@literal_models
def average_effects_row(averages: Mapping[str, EffectAverages], kinds: Sequence[str] = ("hidden", "mlp", "attn"),
                        **kw):
    """The plain kinds side by side on one y scale (the paper's line-plot figure)."""
    present = [averages[k] for k in kinds if k in averages]
    if not present:
        raise ValueError(f"none of the kinds {list(kinds)} in the averages ({', '.join(averages)})")
    y = _y_range(present)
    return row(*[average_effect_figure(a, y_range=y, legend=(i == len(present) - 1), **kw)
                 for i, a in enumerate(present)], name="average-effects")


@literal_models
def severed_comparison(averages: Mapping[str, EffectAverages], bucket: str = "last_subject", *, width: int = 520,
                       height: int = 300) -> figure:
    """Average indirect effect at ``bucket`` of the plain hidden trace vs its severed variants."""
    labels = [k for k in ("hidden", "hidden-severed-mlp", "hidden-severed-attn") if k in averages]
    if "hidden" not in labels or len(labels) < 2:
        raise ValueError("the severed comparison needs 'hidden' and at least one 'hidden-severed-*' average")
    fig = figure(title=f"Effect of a hidden state at the {BUCKET_LABELS[bucket].lower()}, with paths severed "
                       f"({averages['hidden'].n_facts} facts)", width=width, height=height, x_axis_label="layer",
                 y_axis_label="average indirect effect on p(answer)", y_range=_y_range([averages[k] for k in labels]),
                 tools="pan,box_zoom,wheel_zoom,reset,save", name=f"severed-{bucket}")
    names = {"hidden": "no intervention", "hidden-severed-mlp": "MLP severed", "hidden-severed-attn": "attention severed"}
    for label in labels:
        src = ColumnDataSource(_line_data(averages[label], bucket), name=f"sev-{label}")
        color = BUCKET_COLORS[bucket]
        fig.varea(x="layer", y1="lo", y2="hi", source=src, fill_color=color, fill_alpha=0.12)
        fig.line(x="layer", y="aie", source=src, line_color=color, line_width=2.5, line_dash=SEVERED_DASH[label],
                 legend_label=names[label])
    fig.add_tools(HoverTool(tooltips=[("layer", "@layer"), ("AIE", "@aie{0.000}"), ("CI", "@lo{0.000} .. @hi{0.000}")]))
    fig.legend.location = "top_right"
    return fig


def summary_rows(averages: Mapping[str, EffectAverages]) -> list[dict]:
    """One row per kind: facts, mean low/high score, ATE with CI, AIE peaks at last subject / last token."""
    rows = []
    for label, a in averages.items():
        lo, hi = a.total_effect_ci
        rows.append({"kind": label, "facts": a.n_facts, "low": round(a.low_score, 4), "high": round(a.high_score, 4),
                     "ATE": f"{a.total_effect:.3f} [{lo:.3f}, {hi:.3f}]",
                     "AIE peak, last subject token": a.peak_text("last_subject"),
                     "AIE peak, last token": a.peak_text("last")})
    return rows


def _table(rows: list[dict]) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"{TABLE_CSS}<div class='fs-scroll'><table class='fs-table'><tr>{head}</tr>{body}</table></div>"


def averages_summary(averages: Mapping[str, EffectAverages]) -> str:
    """Escaped HTML: how many facts, the total effect, and per kind where the average effect peaks
    at the last subject token and at the last token."""
    first = next(iter(averages.values()))
    lo, hi = first.total_effect_ci
    lines = []
    for label, a in averages.items():
        name = KIND_TITLES[a.kind].format(w=a.window) if a.kind in KIND_TITLES else a.kind
        lines.append(f"<li class='fs-peak' data-kind='{html.escape(label)}'><b>{html.escape(name)}</b>: at the last "
                     f"subject token the effect peaks at {html.escape(a.peak_text('last_subject'))}; at the last "
                     f"token at {html.escape(a.peak_text('last'))}.</li>")
    verdict = ""
    if "mlp" in averages and "attn" in averages and not np.isnan(averages["mlp"].bucket("last_subject")).all():
        m_layer, m_value = averages["mlp"].peak("last_subject")
        a_value = float(np.nanmax(averages["attn"].bucket("last_subject")))
        where = "the MLPs" if m_value >= a_value else "attention"
        verdict = (f"<p class='fs-verdict'>At the last subject token, {where} carry more of the effect: the MLP "
                   f"peaks at layer {m_layer} ({m_value:.3f}), attention at most {a_value:.3f}.</p>")
    return (f"<h2>Summary</h2>{verdict}<p>{first.n_facts} facts of {html.escape(first.model or 'the model')}. Blurring "
            f"the subject lowers the answer's probability by {first.total_effect:.3f} on average "
            f"({first.confidence:.0%} interval {lo:.3f} to {hi:.3f}); restoring one state brings it back most at:</p>"
            f"<ul>{''.join(lines)}</ul>")


def averages_page(averages: Mapping[str, EffectAverages], *, title: str = "Average causal effects",
                  settings: Mapping[str, object] | None = None, date: _dt.datetime | None = None) -> Page:
    """The averages as a :class:`widgets.page.Page`: summary (peaks per kind), the per-kind line
    plots, the severed comparison (when present), the table, provenance (model, date, settings)."""
    if not averages:
        raise ValueError("no averages to show")
    first = next(iter(averages.values()))
    date = date or _dt.datetime.now().astimezone()
    settings = {"facts": first.n_facts, "bootstrap resamples": first.n_boot, "confidence": first.confidence,
                "bootstrap seed": first.seed, **(settings or {})}
    sections = []
    if any(k in averages for k in ("hidden", "mlp", "attn")):
        figs = [Figure(f) for f in average_effects_row(averages).children]
        sections.append(Section("Average indirect effect per layer", "effects", [Row(figs, 3)], HOW_TO_READ["effects"]))
    if "hidden" in averages and any(k.startswith("hidden-severed-") for k in averages):
        blocks = [Figure(severed_comparison(averages))]
        # per-bucket plots of the severed traces only when they were traced beyond the last subject
        # token (which can also be the first subject token or the last token)
        beyond = [BUCKETS.index(b) for b in ("middle_subject", "first_after", "further")]
        severed = [averages[k] for k in ("hidden-severed-mlp", "hidden-severed-attn")
                   if k in averages and averages[k].cells[beyond].any()]
        if severed:
            blocks.append(Row([Figure(average_effect_figure(a)) for a in severed], 2))
        sections.append(Section("Paths severed", "severed", blocks, HOW_TO_READ["severed"]))
    sections.append(Section("Table", "table", [html_div(_table(summary_rows(averages)), name="averages-summary")]))
    provenance = {"Report": {"model": first.model, "date": date.isoformat(timespec="seconds")},
                  "Settings": settings, "Versions": library_versions()}
    return Page(title=title, summary=html_div(averages_summary(averages), name="summary"), sections=sections,
                provenance=provenance, subtitle=f"{first.model} \u00b7 {first.n_facts} facts", name="averages")


def averages_layout(averages: Mapping[str, EffectAverages], **kw):
    """The page of :func:`averages_page` as one Bokeh column."""
    return averages_page(averages, **kw).layout()


def averages_html(averages: Mapping[str, EffectAverages], **kw) -> str:
    """Standalone HTML (Bokeh's JavaScript inlined; works offline)."""
    return averages_page(averages, **kw).html()


def write_html(averages: Mapping[str, EffectAverages], path: str | Path, **kw) -> Path:
    """Write :func:`averages_html` to ``path`` atomically; returns the path."""
    return write_text_atomic(path, averages_html(averages, **kw))
