"""Summary tables: Markdown (for the README) and a standalone HTML page (no scripts, no network).

    summary_markdown([summary_none, summary_memit])   # one row per method, the papers' columns

Rows: the unedited model (the "pre" measurements of the first summary) and each summary's edited
model ("post"). Values are mean ± std over cases, × 100, as in the ROME and MEMIT tables; S has
no std (it is the harmonic mean of the means). After the papers' columns come the ones that do not
only teacher-force (``tracer.evaluate.metrics``): ES-g and PS-g (greedy continuations), NS+ and
NKL (CounterFact+; NKL in nats, three decimals).

Names (method, model, dataset, title) are data: the HTML page escapes them and has no script (so
nothing can typeset them as TeX); the Markdown table backslash-escapes Markdown, HTML and math
punctuation (GitHub renders ``$…$`` and ``$$…$$`` as math), so a name cannot add a column or markup.
"""
from __future__ import annotations

import html
import json
import math
from typing import Sequence

from ..markdown import cell as md_cell

CF_COLUMNS = ("S", "ES", "PS", "NS", "EM", "PM", "NM", "GE", "RS", "ES-g", "PS-g", "NS+", "NKL")
#: decimals per column (others: 1)
DIGITS = {"NKL": 3}
ZSRE_COLUMNS = ("Efficacy", "Paraphrase", "Specificity")


def _cell(stat: dict | None, with_std: bool = True, digits: int = 1) -> str:
    if not stat:
        return "–"
    m, s = stat["mean"], stat.get("std")
    if with_std and s is not None and not math.isnan(s):
        return f"{m:.{digits}f} ± {s:.{digits}f}"
    return f"{m:.{digits}f}"


def summary_rows(summaries: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the combined table."""
    if not summaries:
        return [], []
    zsre = summaries[0]["settings"]["dataset"] == "zsre"
    cols = ZSRE_COLUMNS if zsre else CF_COLUMNS
    header = ["method", "n", *cols, "s / edit"]
    rows = []
    first = summaries[0]
    # the unedited row: a "none" run's measurements (they include generations), else the first run's "pre"
    none = next((s for s in summaries if s["settings"]["method"] == "none"), None)
    base, phase, label = (none, "post", "unedited") if none else (first, "pre", "unedited (pre)")
    rows.append([label, str(base["n_cases"]), *[_cell(base[phase].get(c), digits=DIGITS.get(c, 1)) for c in cols], "–"])
    for s in summaries:
        name = s["settings"]["method"]
        if name == "none":
            continue
        bs = s["settings"].get("batch_size")
        label = f"{name} (batch {bs})" if name == "memit" else name
        sec = s.get("seconds_per_edit")
        rows.append([label, str(s["n_cases"]), *[_cell(s["post"].get(c), digits=DIGITS.get(c, 1)) for c in cols],
                     f"{sec:.2f}" if sec is not None else "–"])
    return header, rows


def summary_markdown(summaries: Sequence[dict]) -> str:
    """The table in Markdown, every cell and name escaped (:func:`_md`), then dataset, model, date."""
    header, rows = summary_rows(summaries)
    if not header:
        return ""
    lines = ["| " + " | ".join(map(md_cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(md_cell, r)) + " |" for r in rows]
    meta = summaries[0]
    lines.append("")
    lines.append(f"{md_cell(meta['settings']['dataset'])}, model {md_cell(meta['settings']['model'])}, {md_cell(meta['date'])}")
    return "\n".join(lines) + "\n"


_CSS = ("<style>body{font:13px sans-serif;margin:20px}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}pre{font-size:11px}</style>")


def summary_html(summaries: Sequence[dict], title: str = "factscope evaluation") -> str:
    """A standalone page: the table, then each run's settings."""
    header, rows = summary_rows(summaries)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    settings = "".join(f"<h3>{html.escape(s['settings']['method'])}</h3><pre>{html.escape(json.dumps(s['settings'], indent=1, default=str))}</pre>"
                       for s in summaries)
    date = html.escape(summaries[0]["date"]) if summaries else ""
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{_CSS}</head><body>"
            f"<h1>{html.escape(title)}</h1><p>{date}</p><table><tr>{head}</tr>{body}</table>{settings}</body></html>")
