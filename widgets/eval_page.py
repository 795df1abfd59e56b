"""The evaluation page: `factscope evaluate` runs side by side, on the one page template.

    page = eval_page([build_summary("out/none"), build_summary("out/rome")])
    write_eval_html(summaries, "table.html")

Summary first (the run with the best score, each run's efficacy / generalisation / specificity),
then a bar chart of those three per run (colours from :mod:`widgets.palette`: vermillion the new
answer on the edited prompt, orange on paraphrases, blue the true answer kept on neighbours), the
full table (:func:`tracer.evaluate.report.summary_rows`, the same cells as the Markdown table) and
each run's settings as provenance. Method, model and dataset names are data: escaped, never TeX.
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Sequence

from bokeh.models import ColumnDataSource, FactorRange, HoverTool, Range1d, Whisker
from bokeh.plotting import figure

from tracer.evaluate.report import summary_rows
from tracer.files import write_text_atomic

from .figures import TABLE_CSS
from .page import Figure, Page, Section
from .palette import METRIC_COLORS
from .report import library_versions
from .text import html_div, literal_models

#: (efficacy, generalisation, specificity) column of each dataset's table
METRICS = {"counterfact": ("ES", "PS", "NS"), "zsre": ("Efficacy", "Paraphrase", "Specificity")}
ROLES = ("efficacy", "generalization", "specificity")
HOW_TO_READ = ("For each run, three bars (mean over cases, × 100, with ± one standard deviation): the new answer "
               "preferred on the edited prompt (vermillion), on paraphrases (orange), and the true answer kept on "
               "neighbouring facts (blue). A good editor has all three high; the unedited model shows where they start.")


def _metrics(summaries: Sequence[dict]) -> tuple[str, ...]:
    return METRICS["zsre" if summaries[0]["settings"]["dataset"] == "zsre" else "counterfact"]


def runs(summaries: Sequence[dict]) -> list[tuple[str, dict]]:
    """``(label, measurements)`` per row of the table: the unedited model (a ``none`` run's
    measurements, else the first run's pre-edit ones), then each edited run; the labels are the
    first cells of :func:`tracer.evaluate.report.summary_rows`."""
    _, rows = summary_rows(summaries)
    none = next((s for s in summaries if s["settings"]["method"] == "none"), None)
    stats = [none["post"] if none else summaries[0]["pre"]]
    stats += [s["post"] for s in summaries if s["settings"]["method"] != "none"]
    return [(row[0], st) for row, st in zip(rows, stats)]


def _value(stat: dict | None, key: str) -> float:
    v = (stat or {}).get(key)
    return float(v) if v is not None and not (isinstance(v, float) and math.isnan(v)) else float("nan")


@literal_models
def eval_bars(summaries: Sequence[dict], *, width: int = 640) -> figure:
    """Efficacy, generalisation and specificity per run, grouped bars with ± std whiskers."""
    metrics = _metrics(summaries)
    data = {"x": [], "mean": [], "lo": [], "hi": [], "color": [], "metric": [], "run": []}
    for label, st in runs(summaries):
        for name, role in zip(metrics, ROLES):
            m, s = _value(st.get(name), "mean"), _value(st.get(name), "std")
            s = 0.0 if math.isnan(s) else s
            data["x"].append((label, name))
            data["mean"].append(m)
            data["lo"].append(m - s)
            data["hi"].append(m + s)
            data["color"].append(METRIC_COLORS[role])
            data["metric"].append(name)
            data["run"].append(label)
    source = ColumnDataSource(data, name="eval_data")
    fig = figure(title="Efficacy, generalisation, specificity (× 100)", x_range=FactorRange(*data["x"]),
                 y_range=Range1d(0, max([105.0] + [h for h in data["hi"] if h == h]) + 25), width=width, height=320, tools="save,reset", toolbar_location="above",
                 name="eval_bars")
    bars = fig.vbar(x="x", top="mean", width=0.85, source=source, fill_color="color", line_color="color",
                    legend_field="metric")
    fig.add_layout(Whisker(base="x", lower="lo", upper="hi", source=source, line_color="#444444"))
    fig.add_tools(HoverTool(renderers=[bars], tooltips=[("run", "@run"), ("metric", "@metric"),
                                                         ("mean", "@mean{0.0}")]))
    fig.xaxis.major_label_orientation = 0.8
    fig.xgrid.visible = False
    fig.legend.orientation = "horizontal"
    fig.legend.location = "top_right"
    return fig


def eval_summary(summaries: Sequence[dict]) -> str:
    """Escaped HTML: dataset, model, cases; the best run by the table's score; each run's three metrics."""
    metrics = _metrics(summaries)
    settings = summaries[0]["settings"]
    rated = runs(summaries)
    score_key = "S" if "S" in summaries[0].get("post", {}) else None
    lines = []
    for label, st in rated:
        vals = ", ".join(f"{html.escape(n)} {_value(st.get(n), 'mean'):.1f}" for n in metrics)
        lines.append(f"<li class='fs-run'><b>{html.escape(label)}</b>: {vals}</li>")
    verdict = ""
    edited = rated[1:]
    if edited:
        key = (lambda r: _value(r[1].get(score_key), "mean")) if score_key else \
            (lambda r: sum(_value(r[1].get(n), "mean") for n in metrics) / len(metrics))
        best = max(edited, key=lambda r: -math.inf if math.isnan(key(r)) else key(r))
        what = "score S" if score_key else "mean of the three"
        verdict = (f"<p class='fs-verdict'>Best edited run: {html.escape(best[0])} ({what} {key(best):.1f}).</p>")
    return (f"<h2>Summary</h2>{verdict}<p>{html.escape(str(settings['dataset']))}, model "
            f"{html.escape(str(settings.get('model', '')))}, {summaries[0]['n_cases']} cases in the first run. "
            f"Means × 100:</p><ul>{''.join(lines)}</ul>")


def _table(summaries: Sequence[dict]) -> str:
    header, rows = summary_rows(summaries)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td class='fs-num'>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"{TABLE_CSS}<div class='fs-scroll'><table class='fs-table'><tr>{head}</tr>{body}</table></div>"


def eval_page(summaries: Sequence[dict], *, title: str = "factscope evaluation") -> Page:
    """The evaluation runs as a :class:`widgets.page.Page` (summary, chart, table, provenance)."""
    if not summaries:
        raise ValueError("no evaluation summaries to show")
    sections = [Section("Efficacy, generalisation, specificity", "metrics", [Figure(eval_bars(summaries))], HOW_TO_READ),
                Section("Table", "table", [html_div(_table(summaries), name="eval_table")],
                        "Mean ± standard deviation over cases, × 100, with the papers' columns (docs/evaluation.md).")]
    provenance = {"Report": {"date": summaries[0].get("date", ""), "dataset": summaries[0]["settings"]["dataset"]}}
    for i, s in enumerate(summaries):
        provenance[f"Run {i + 1}: {s['settings']['method']}"] = {k: v for k, v in s["settings"].items()}
    provenance["Versions"] = library_versions()
    settings = summaries[0]["settings"]
    return Page(title=title, summary=html_div(eval_summary(summaries), name="summary"), sections=sections,
                provenance=provenance, subtitle=f"{settings['dataset']} \u00b7 {settings.get('model', '')}", name="eval")


def write_eval_html(summaries: Sequence[dict], path: str | Path, **kw) -> Path:
    """Write :func:`eval_page` as standalone HTML to ``path`` atomically; returns the path."""
    return write_text_atomic(path, eval_page(summaries, **kw).html())
