"""widgets.aggregate_figures: the figures carry the averages' numbers; the HTML is self-contained."""
from __future__ import annotations

import html
from dataclasses import replace

import numpy as np
import pytest
from test_aggregate import make_trace, random_traces

from tracer.aggregate import BUCKETS, aggregate
from widgets.aggregate_figures import (average_effect_figure, average_effects_row, averages_html,
                                       severed_comparison, summary_rows)


@pytest.fixture(scope="module")
def averages():
    out = {kind: aggregate(random_traces(25, seed=i, n_layers=6, kind=kind), n_boot=100, seed=0)
           for i, kind in enumerate(("hidden", "mlp", "attn"))}
    sev = [replace(t, severed="mlp", scores=t.low_score + 0.5 * (t.scores - t.low_score))
           for t in random_traces(25, seed=0, n_layers=6)]
    out["hidden-severed-mlp"] = aggregate(sev, n_boot=100, seed=0)
    return out


def test_lines_and_bands_carry_the_numbers(averages):
    avg = averages["mlp"]
    fig = average_effect_figure(avg)
    i = BUCKETS.index("last_subject")
    data = fig.select_one({"name": "aie-mlp-last_subject"}).data
    assert data["layer"] == list(range(6))
    assert np.array_equal(data["aie"], avg.indirect[i])
    assert np.array_equal(data["lo"], avg.indirect_ci[0, i]) and np.array_equal(data["hi"], avg.indirect_ci[1, i])
    assert all(lo <= y <= hi for lo, y, hi in zip(data["lo"], data["aie"], data["hi"]))


def test_empty_bucket_is_left_out():
    # every subject is one token followed by the last token: no middle, no further tokens
    traces = [make_trace(np.random.default_rng(i).random((3, 4)), (1, 2), 0.1, 0.9) for i in range(5)]
    fig = average_effect_figure(aggregate(traces, n_boot=10))
    from bokeh.models import ColumnDataSource

    names = {m.name for m in fig.select({"type": ColumnDataSource})}
    assert "aie-hidden-middle_subject" not in names and "aie-hidden-further" not in names
    assert {"aie-hidden-first_subject", "aie-hidden-last_subject", "aie-hidden-last"} <= names


def test_severed_comparison_and_row(averages):
    fig = severed_comparison(averages)
    plain = fig.select_one({"name": "sev-hidden"}).data["aie"]
    cut = fig.select_one({"name": "sev-hidden-severed-mlp"}).data["aie"]
    np.testing.assert_allclose(cut, 0.5 * np.asarray(plain), atol=1e-12)  # the severed traces above keep half
    row_ = average_effects_row(averages)
    assert len(row_.children) == 3 and len({id(f.y_range) for f in row_.children}) == 1  # one shared y scale
    with pytest.raises(ValueError, match="severed"):
        severed_comparison({"hidden": averages["hidden"]})


def test_standalone_html(averages):
    text = averages_html(averages, title="Averages <test>")
    assert "cdn.bokeh.org" not in text and "Bokeh" in text and len(text) > 500_000  # JavaScript inlined
    assert "Averages &lt;test&gt;" in text and "MLP severed" in text
    rows = summary_rows(averages)
    assert [r["kind"] for r in rows] == ["hidden", "mlp", "attn", "hidden-severed-mlp"]
    layer, value = averages["mlp"].peak("last_subject")
    assert rows[1]["AIE peak, last subject token"] == f"layer {layer} ({value:.3f})"


def test_layout_skips_per_bucket_plots_of_last_subject_only_severed_traces(averages):
    from widgets.aggregate_figures import averages_layout

    assert averages_layout(averages).select_one({"name": "aie-hidden-severed-mlp"}) is not None
    one_row = []
    for t in random_traces(25, seed=0, n_layers=6):
        scores = np.full_like(t.scores, np.nan)
        scores[t.subject_span[1] - 1] = t.scores[t.subject_span[1] - 1]
        one_row.append(make_trace(scores, t.subject_span, t.low_score, t.high_score, severed="mlp"))
    last_only = dict(averages, **{"hidden-severed-mlp": aggregate(one_row, n_boot=20, seed=0)})
    layout = averages_layout(last_only)
    assert layout.select_one({"name": "aie-hidden-severed-mlp"}) is None
    cut = layout.select_one({"name": "sev-hidden-severed-mlp"}).data["aie"]
    assert np.isfinite(cut).all()
    assert summary_rows(last_only)[3]["AIE peak, last token"] == "not traced"


def test_hostile_names_stay_literal(averages):
    """A model name, kind, title or setting from a dataset run is never TeX or HTML on the page."""
    from bokeh.models import Div
    from test_text import HOSTILE, HOSTILE_TEXTS, math_exposures, texts

    from widgets.aggregate_figures import averages_layout

    hostile = {k: replace(a, model=HOSTILE) for k, a in averages.items()}
    hostile[HOSTILE_TEXTS[1]] = replace(averages["attn"], kind=HOSTILE_TEXTS[2], model=HOSTILE)
    layout = averages_layout(hostile, title=HOSTILE_TEXTS[3], settings={HOSTILE_TEXTS[1]: HOSTILE_TEXTS[2]})
    assert math_exposures(layout) == []
    assert {d.disable_math for d in layout.select({"type": Div})} == {True}
    fig = average_effect_figure(hostile[HOSTILE_TEXTS[1]])
    assert math_exposures(fig) == [] and HOSTILE_TEXTS[2] in fig.title.text.text
    shown = texts(layout)
    for text in HOSTILE_TEXTS:
        assert html.escape(text) in shown
    page = averages_html(hostile, title=HOSTILE)
    assert "bokeh-mathjax" not in page and f"<title>{html.escape(HOSTILE)}</title>" in page
