"""widgets.eval_page and ``factscope eval-table --html``: the evaluation runs on the page template,
from the recorded CounterFact runs of bench/results/counterfact.json (real numbers)."""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

import pytest

from test_text import HOSTILE, math_exposures
from widgets.eval_page import eval_bars, eval_page, eval_summary, runs

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"unedited": "none", "ft-l": "ft-l", "rome": "rome", "memit": "memit"}


def recorded_summaries() -> list[dict]:
    """``build_summary``-shaped dicts of the four CounterFact runs recorded in bench/results."""
    figures = json.loads((ROOT / "bench" / "results" / "counterfact.json").read_text())["figures"]
    out = []
    for row in figures["rows"]:
        stats = {k: (v if isinstance(v, dict) else {"mean": v, "std": math.nan}) for k, v in row.items()
                 if k not in ("method", "n", "s_per_edit", "batch")}
        method = METHODS[row["method"]]
        settings = {"method": method, "dataset": figures["dataset"], "model": figures["model"]}
        if "batch" in row:
            settings["batch_size"] = row["batch"]
        out.append({"date": "2026-11-30", "settings": settings, "n_cases": row["n"], "pre": stats, "post": stats,
                    "seconds_per_edit": row["s_per_edit"]})
    return out


def test_summary_names_the_best_run_and_each_runs_metrics():
    summaries = recorded_summaries()
    text = eval_summary(summaries)
    assert "Best edited run: rome (score S 82.4)" in text  # rome 82.4 > memit 82.1 > ft-l 66.6
    assert "<b>unedited</b>: ES 34.5, PS 33.0, NS 65.1" in text
    assert "<b>memit (batch 200)</b>: ES 100.0, PS 92.8, NS 63.4" in text


def test_bars_carry_the_table_numbers():
    summaries = recorded_summaries()
    data = eval_bars(summaries).select_one({"name": "eval_data"}).data
    assert [label for label, _ in runs(summaries)] == ["unedited", "ft-l", "rome", "memit (batch 200)"]
    assert data["x"][6:9] == [("rome", "ES"), ("rome", "PS"), ("rome", "NS")]
    assert data["mean"][6:9] == [97.0, 96.5, 63.6]
    assert data["hi"][6] == pytest.approx(97.0 + 17.1) and data["lo"][8] == pytest.approx(63.6 - 37.5)
    assert len(set(data["color"][:3])) == 3 and data["color"][:3] == data["color"][3:6]  # one colour per metric


def test_page_holds_summary_chart_table_and_provenance():
    summaries = recorded_summaries()
    page = eval_page(summaries, title="CounterFact <200>").html()
    assert "CounterFact &lt;200&gt;" in page and "cdn.bokeh.org" not in page
    assert page.index("id='summary'") < page.index("id='metrics'") < page.index("id='table'") < page.index("id='provenance'")
    assert "82.1" in page and "Run 4: memit" in page


def test_hostile_method_and_model_names_stay_literal():
    summaries = recorded_summaries()
    summaries[1]["settings"]["method"] = HOSTILE
    summaries[1]["settings"]["model"] = HOSTILE
    layout = eval_page(summaries, title=HOSTILE).layout()
    assert math_exposures(layout) == []
    page = eval_page(summaries, title=HOSTILE).html()
    assert html.escape(HOSTILE) in page and "bokeh-mathjax" not in page
