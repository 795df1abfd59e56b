"""Figures of dataset-level average causal effects (:class:`tracer.aggregate.EffectAverages`).

    fig = average_effect_figure(averages["mlp"])        # one line + CI band per token bucket
    row_ = average_effects_row(averages)                # hidden / MLP / attention side by side
    sev = severed_comparison(averages)                  # the paper's Figure 7 at one bucket
    write_html(averages, "averages.html")               # standalone, all JavaScript inlined

Pure builders: results in, Bokeh models out. The page reuses the report header of
:mod:`widgets.report` and, like it, inlines Bokeh's JavaScript (no CDN; works offline) and shows
every text literally (:mod:`widgets.text`: model names, kinds and settings are never TeX or HTML).
Each line's data source is named ``aie-<kind>-<bucket>`` (``sev-<kind>`` in the severed comparison)
so tests and panels can find it.
"""
from __future__ import annotations

import datetime as _dt
import html
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from bokeh.embed import file_html
from bokeh.layouts import column, row
from bokeh.models import ColumnDataSource, HoverTool, Range1d
from bokeh.palettes import Category10
from bokeh.plotting import figure
from bokeh.resources import INLINE

from tracer.aggregate import BUCKET_LABELS, BUCKETS, EffectAverages
from tracer.files import write_text_atomic

from .figures import TABLE_CSS
from .report import build_report
from .text import html_div, literal, literal_models

#: ROME's line colours (tab10 in the order first, middle, last subject, first after, further, last)
BUCKET_COLORS = dict(zip(BUCKETS, [Category10[10][i] for i in (0, 1, 2, 4, 5, 3)]))
KIND_TITLES = {"hidden": "a single hidden vector", "mlp": "a run of {w} MLP lookups",
               "attn": "a run of {w} attention modules", "hidden-severed-mlp": "a hidden vector, MLP path severed",
               "hidden-severed-attn": "a hidden vector, attention path severed"}
SEVERED_COLORS = {"hidden": "#7b3294", "hidden-severed-mlp": "#1a9641", "hidden-severed-attn": "#d7191c"}


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
        color = SEVERED_COLORS[label]
        fig.varea(x="layer", y1="lo", y2="hi", source=src, fill_color=color, fill_alpha=0.15)
        fig.line(x="layer", y="aie", source=src, line_color=color, line_width=2, legend_label=names[label])
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
    return f"{TABLE_CSS}<table class='fs-table'><tr>{head}</tr>{body}</table>"


@literal_models
def averages_layout(averages: Mapping[str, EffectAverages], *, title: str = "Average causal effects",
                    settings: Mapping[str, object] | None = None, date: _dt.datetime | None = None):
    """The report header of :func:`widgets.report.build_report` (model, date, versions, settings),
    then a summary table, the per-kind line plots and (when present) the severed comparison."""
    if not averages:
        raise ValueError("no averages to show")
    first = next(iter(averages.values()))
    settings = {"facts": first.n_facts, "bootstrap resamples": first.n_boot, "confidence": first.confidence,
                "bootstrap seed": first.seed, **(settings or {})}
    parts = [build_report(model=first.model, settings=settings, title=title, date=date),
             html_div(_table(summary_rows(averages)), name="averages-summary")]
    if any(k in averages for k in ("hidden", "mlp", "attn")):
        parts.append(average_effects_row(averages))
    if "hidden" in averages and any(k.startswith("hidden-severed-") for k in averages):
        parts.append(severed_comparison(averages))
        # per-bucket plots of the severed traces only when they were traced beyond the last subject
        # token (which can also be the first subject token or the last token)
        beyond = [BUCKETS.index(b) for b in ("middle_subject", "first_after", "further")]
        severed = [averages[k] for k in ("hidden-severed-mlp", "hidden-severed-attn")
                   if k in averages and averages[k].cells[beyond].any()]
        if severed:
            parts.append(row(*[average_effect_figure(a) for a in severed]))
    return column(*parts, name="averages")


def averages_html(averages: Mapping[str, EffectAverages], **kw) -> str:
    """Standalone HTML (Bokeh's JavaScript inlined from ``bokeh.resources.INLINE``; works offline)."""
    layout = literal(averages_layout(averages, **kw))  # again here: whatever a part forgot, the page shows literally
    return file_html(layout, resources=INLINE, title=kw.get("title", "Average causal effects"))


def write_html(averages: Mapping[str, EffectAverages], path: str | Path, **kw) -> Path:
    """Write :func:`averages_html` to ``path`` atomically; returns the path."""
    return write_text_atomic(path, averages_html(averages, **kw))
