"""The sequential-editing health page: norm growth, perplexity and retention per batch, on the one page template.

    records, health = sequential_memit(lm, requests, batch_size=100)
    page = health_page(health, settings={"model": lm.name, "method": "memit", "batch size": 100})
    write_health_html(health, "health.html", settings=...)
    health_page_from_run("out/seq")     # a `factscope sequential` directory: run.json + health.json

Input: :class:`tracer.edit.sequential.Health` read-outs (row 0: the unedited model) or their
dicts, as ``sequential_memit`` returns them and ``health.json`` stores them. Summary first (how
far the edited matrices grew, how perplexity moved, how many earlier edits still hold, where a
guard stopped the run), then one chart per reading with how to read it, the table, and the run's
provenance (its settings, the guard, library versions). Readings a run did not take (entropy,
efficacy, retention are optional) are left out. Every name and setting is data: escaped, never TeX.
"""
from __future__ import annotations

import datetime as _dt
import html
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from bokeh.models import ColumnDataSource, HoverTool, Span
from bokeh.plotting import figure

from tracer.errors import FactscopeError
from tracer.files import write_text_atomic

from .figures import TABLE_CSS
from .page import Figure, Page, Section
from .palette import AFTER_DASH, BEFORE_DASH, INK, METRIC_COLORS, NEUTRAL, OKABE_ITO
from .report import library_versions
from .text import html_div, literal_models

#: retention (earlier edits that still hold) and fluency, beside the evaluation page's efficacy colour
HEALTH_COLORS = {"efficacy": METRIC_COLORS["efficacy"], "retention": OKABE_ITO["green"],
                 "perplexity": INK, "entropy": OKABE_ITO["sky"]}
HOW_TO_READ = {
    "norms": "Each line is one edited weight matrix (darker: deeper layer): its size (Frobenius norm) after each batch, "
             "relative to the unedited matrix, against the number of edits so far. Steady growth is expected; a "
             "sudden climb is the first sign that sequential edits are wearing the model out.",
    "perplexity": "Perplexity of held-out Wikipedia text (lower is better) after each batch; the dashed line is the "
                  "unedited model. A model that edits have damaged predicts ordinary text worse, so the line climbs.",
    "holds": "After each batch: the share of that batch's edits that hold (the new answer beats the true one on "
             "the edited prompt, vermillion) and the share of a sample of earlier edits that still hold (green). "
             "Retention falling batch after batch means later edits overwrite earlier ones.",
}


def health_rows(health: Sequence[Any]) -> list[dict]:
    """The read-outs as dicts (``Health.to_dict()`` or dicts as ``health.json`` holds them), batch order."""
    rows = [dict(h.to_dict() if hasattr(h, "to_dict") else h) for h in health]
    if not rows:
        raise FactscopeError("no health read-outs to show")
    for r in rows:
        missing = {"batch", "n_edits", "norm_ratio", "perplexity"} - set(r)
        if missing:
            raise FactscopeError(f"a health read-out lacks {sorted(missing)}; expected Health records or their dicts")
    return sorted(rows, key=lambda r: r["batch"])


def layer_label(module: str) -> str:
    """``"model.layers.4.mlp.down_proj"`` -> ``"layer 4"`` (the module name if it has no number)."""
    m = re.search(r"\.(\d+)\.", module)
    return f"layer {m.group(1)}" if m else module


def _ramp(n: int) -> list[str]:
    """``n`` greys from light to near-black: shallow to deep layers."""
    return ["#%02x%02x%02x" % ((v,) * 3) for v in np.linspace(0xb0, 0x22, n).astype(int)] if n > 1 else [INK]


def _value(r: Mapping, key: str) -> float:
    v = r.get(key)
    return float(v) if v is not None else float("nan")


@literal_models
def norm_figure(health: Sequence[Any], *, limit: float | None = None, width: int = 560) -> figure:
    """‖W‖ / ‖W₀‖ of every edited matrix against the number of edits, one line per matrix
    (data sources ``norm-<module>``); ``limit``: a guard's threshold, drawn dotted."""
    rows = health_rows(health)
    modules = list(rows[0]["norm_ratio"])
    fig = figure(title="Size of the edited weight matrices", width=width, height=300, x_axis_label="edits so far",
                 y_axis_label="‖W‖ / ‖W₀‖", tools="pan,box_zoom,reset,save", name="health_norms")
    for module, color in zip(modules, _ramp(len(modules))):
        data = {"edits": [r["n_edits"] for r in rows], "ratio": [float(r["norm_ratio"][module]) for r in rows],
                "batch": [r["batch"] for r in rows], "matrix": [module] * len(rows)}
        src = ColumnDataSource(data, name=f"norm-{module}")
        fig.line(x="edits", y="ratio", source=src, line_color=color, line_width=2, legend_label=layer_label(module))
        fig.scatter(x="edits", y="ratio", source=src, color=color, size=5)
    fig.add_layout(Span(location=1.0, dimension="width", line_color=NEUTRAL, line_dash=BEFORE_DASH, line_width=1))
    if limit is not None:
        fig.add_layout(Span(location=limit, dimension="width", line_color=INK, line_dash="dotted", line_width=1.5,
                            name="norm_limit"))
    fig.add_tools(HoverTool(tooltips=[("matrix", "@matrix"), ("batch", "@batch"), ("edits", "@edits"),
                                      ("‖W‖/‖W₀‖", "@ratio{0.0000}")]))
    fig.legend.location = "top_left"
    fig.legend.label_text_font_size = "10px"
    return fig


@literal_models
def perplexity_figure(health: Sequence[Any], *, width: int = 560) -> figure:
    """Perplexity of held-out text after each batch (source ``perplexity_data``); the unedited
    model's as a dashed line (n-gram entropy, when read, is in the table)."""
    rows = health_rows(health)
    data = {"edits": [r["n_edits"] for r in rows], "perplexity": [float(r["perplexity"]) for r in rows],
            "batch": [r["batch"] for r in rows]}
    src = ColumnDataSource(data, name="perplexity_data")
    fig = figure(title="Perplexity of held-out text", width=width, height=300, x_axis_label="edits so far",
                 y_axis_label="perplexity", tools="pan,box_zoom,reset,save", name="health_perplexity")
    fig.line(x="edits", y="perplexity", source=src, line_color=HEALTH_COLORS["perplexity"], line_width=2,
             line_dash=AFTER_DASH, legend_label="after each batch")
    fig.scatter(x="edits", y="perplexity", source=src, color=HEALTH_COLORS["perplexity"], size=6)
    fig.add_layout(Span(location=data["perplexity"][0], dimension="width", line_color=NEUTRAL, line_dash=BEFORE_DASH,
                        line_width=1.5, name="perplexity_unedited"))
    fig.add_tools(HoverTool(tooltips=[("batch", "@batch"), ("edits", "@edits"), ("perplexity", "@perplexity{0.000}")]))
    fig.legend.location = "top_left"
    return fig


@literal_models
def holds_figure(health: Sequence[Any], *, limit: float | None = None, width: int = 560) -> figure:
    """Efficacy (this batch's edits that hold) and retention (earlier edits that still hold) per
    batch, × 100 (sources ``health_efficacy``, ``health_retention``); ``limit``: a guard's minimum retention."""
    rows = [r for r in health_rows(health) if r["batch"] > 0]
    fig = figure(title="Edits that hold", width=width, height=300, x_axis_label="edits so far",
                 y_axis_label="share that holds (× 100)", y_range=(-5, 105), tools="pan,box_zoom,reset,save",
                 name="health_holds")
    for key, label in (("efficacy", "this batch's edits"), ("retention", "earlier edits (sample)")):
        kept = [r for r in rows if r.get(key) is not None]
        if not kept:
            continue
        data = {"edits": [r["n_edits"] for r in kept], "share": [100 * float(r[key]) for r in kept],
                "batch": [r["batch"] for r in kept]}
        src = ColumnDataSource(data, name=f"health_{key}")
        fig.line(x="edits", y="share", source=src, line_color=HEALTH_COLORS[key], line_width=2, legend_label=label)
        fig.scatter(x="edits", y="share", source=src, color=HEALTH_COLORS[key], size=6)
    if limit is not None:
        fig.add_layout(Span(location=100 * limit, dimension="width", line_color=INK, line_dash="dotted",
                            line_width=1.5, name="retention_limit"))
    fig.add_tools(HoverTool(tooltips=[("batch", "@batch"), ("edits", "@edits"), ("holds", "@share{0.0}")]))
    if fig.legend:
        fig.legend.location = "bottom_left"
    return fig


def _fmt(v: Any, spec: str) -> str:
    return "\u2013" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def health_table(health: Sequence[Any]) -> str:
    """Escaped HTML: one row per read-out (batch, edits, largest norm ratio, perplexity, and the
    optional readings a run took), the cells of ``factscope sequential``'s Markdown table."""
    rows = health_rows(health)
    optional = [k for k in ("entropy", "efficacy", "retention") if any(r.get(k) is not None for r in rows)]
    head = ["batch", "edits", "max ‖W‖/‖W₀‖", "perplexity", *optional, "seconds"]
    body = []
    for r in rows:
        cells = [str(r["batch"]), str(r["n_edits"]), _fmt(max(r["norm_ratio"].values(), default=None), ".4f"),
                 _fmt(r["perplexity"], ".3f"), *[_fmt(r.get(k), ".3f" if k == "entropy" else ".2f") for k in optional],
                 _fmt(r.get("seconds"), ".1f")]
        body.append("<tr>" + "".join(f"<td class='fs-num'>{html.escape(c)}</td>" for c in cells) + "</tr>")
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f"{TABLE_CSS}<div class='fs-scroll'><table class='fs-table'><tr>{header}</tr>{''.join(body)}</table></div>"


def health_summary(health: Sequence[Any], breach: Mapping | None = None) -> str:
    """Escaped HTML: a verdict line (where the guard stopped the run, or how far the model moved),
    then the largest norm growth, the perplexity change and the last retention, with their batches."""
    rows = health_rows(health)
    first, last = rows[0], rows[-1]
    batches = len(rows) - 1
    growth = [(r["batch"], m, float(v)) for r in rows[1:] for m, v in r["norm_ratio"].items()]
    b_max, m_max, v_max = max(growth, key=lambda g: g[2]) if growth else (0, "", 1.0)
    p0, p1 = float(first["perplexity"]), float(last["perplexity"])
    lines = [f"<li class='fs-norm'>Largest edited matrix: {html.escape(layer_label(m_max))} grew to "
             f"{v_max:.4f} × its unedited size ({(v_max - 1) * 100:+.2f}%) by batch {b_max}.</li>" if growth else
             "<li class='fs-norm'>No batch was kept.</li>",
             f"<li class='fs-ppl'>Perplexity of held-out text: {p0:.3f} unedited, {p1:.3f} after batch {last['batch']} "
             f"({(p1 / p0 - 1) * 100:+.1f}%).</li>"]
    kept = [r for r in rows[1:] if r.get("retention") is not None]
    if kept:
        worst = min(kept, key=lambda r: r["retention"])
        lines.append(f"<li class='fs-retention'>Earlier edits that still hold: {100 * kept[-1]['retention']:.0f}% after "
                     f"batch {kept[-1]['batch']} (lowest {100 * worst['retention']:.0f}%, batch {worst['batch']}).</li>")
    else:
        lines.append("<li class='fs-retention'>Retention of earlier edits was not measured in this run.</li>")
    eff = [r for r in rows[1:] if r.get("efficacy") is not None]
    if eff:
        lines.append(f"<li class='fs-efficacy'>Edits of each batch that hold: {100 * min(r['efficacy'] for r in eff):.0f}% "
                     f"to {100 * max(r['efficacy'] for r in eff):.0f}%.</li>")
    if breach:
        crossed = "; ".join(f"{c.get('reading', '')} {float(c.get('value', float('nan'))):.4g} (limit {c.get('limit')})"
                            for c in breach.get("crossed", []))
        verdict = (f"Stopped at batch {breach.get('batch')}: {crossed}. That batch was reverted; the model keeps "
                   f"{last['n_edits']} edits in {batches} batch{'es' if batches != 1 else ''}.")
    else:
        verdict = (f"{last['n_edits']} edits in {batches} batch{'es' if batches != 1 else ''}: the edited matrices grew "
                   f"by at most {(v_max - 1) * 100:.2f}% and perplexity moved {(p1 / p0 - 1) * 100:+.1f}%.")
    return (f"<h2>Summary</h2><p class='fs-verdict'>{html.escape(verdict)}</p><ul>{''.join(lines)}</ul>")


def _flat(settings: Mapping[str, Any]) -> dict[str, str]:
    """Settings for a provenance table: nested values as compact JSON."""
    return {str(k): (json.dumps(v, sort_keys=True, default=str) if isinstance(v, (dict, list, tuple)) else str(v))
            for k, v in settings.items()}


def health_page(health: Sequence[Any], *, settings: Mapping[str, Any] | None = None, guard: Mapping | None = None,
                breach: Mapping | None = None, title: str = "factscope: sequential editing health",
                date: _dt.datetime | None = None) -> Page:
    """The read-outs as a :class:`widgets.page.Page`: summary, norm growth, perplexity, edits that
    hold (when measured), the table, provenance (``settings``, ``guard``, date, versions)."""
    rows = health_rows(health)
    guard = dict(guard or {})
    sections = [Section("Weight norms", "norms", [Figure(norm_figure(rows, limit=guard.get("max_norm_growth")))],
                        HOW_TO_READ["norms"]),
                Section("Perplexity", "perplexity", [Figure(perplexity_figure(rows))], HOW_TO_READ["perplexity"])]
    if any(r.get("efficacy") is not None or r.get("retention") is not None for r in rows):
        sections.append(Section("Edits that hold", "holds", [Figure(holds_figure(rows, limit=guard.get("min_retention")))],
                                HOW_TO_READ["holds"]))
    sections.append(Section("Table", "table", [html_div(health_table(rows), name="health_table")],
                            "One row per batch; batch 0 is the unedited model."))
    settings = dict(settings or {})
    date = date or _dt.datetime.now().astimezone()
    provenance: dict[str, Mapping[str, object]] = {"Report": {"date": date.isoformat(timespec="seconds"),
                                                              "batches": len(rows) - 1, "edits": rows[-1]["n_edits"]}}
    if settings:
        provenance["Settings"] = _flat(settings)
    if guard:
        provenance["Guard"] = _flat(guard)
    provenance["Versions"] = library_versions()
    sub = " \u00b7 ".join(str(settings[k]) for k in ("model", "method") if settings.get(k))
    return Page(title=title, summary=html_div(health_summary(rows, breach), name="summary"), sections=sections,
                provenance=provenance, subtitle=sub, name="health")


def read_run(directory: str | Path) -> dict:
    """A ``factscope sequential`` directory as keyword arguments of :func:`health_page`:
    ``health`` (rows of ``health.json``), ``breach``, ``settings`` and ``guard`` (``run.json``)."""
    d = Path(directory)
    try:
        health = json.loads((d / "health.json").read_text(encoding="utf-8"))
        run = json.loads((d / "run.json").read_text(encoding="utf-8")) if (d / "run.json").is_file() else {}
    except FileNotFoundError:
        raise FactscopeError(f"{str(d)!r} holds no health.json; pass the --out directory of a sequential run") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FactscopeError(f"{str(d)!r}: health.json or run.json is not valid JSON ({e})") from None
    if not isinstance(health, dict) or not isinstance(health.get("rows"), list):
        raise FactscopeError(f"{str(d / 'health.json')!r} has no list of rows; it is not a sequential run's read-out")
    return {"health": health["rows"], "breach": health.get("breach"), "settings": run.get("settings") or {},
            "guard": run.get("guard") or {}}


def health_page_from_run(directory: str | Path, **kw) -> Page:
    """:func:`health_page` of a ``factscope sequential`` directory."""
    return health_page(**{**read_run(directory), **kw})


def write_health_html(health: Sequence[Any], path: str | Path, **kw) -> Path:
    """Write :func:`health_page` as standalone HTML to ``path`` atomically; returns the path."""
    return write_text_atomic(path, health_page(health, **kw).html())
