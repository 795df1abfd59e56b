"""widgets/figures.py: figures carry exactly the result's data (values, labels, subject marks)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from bokeh.models import ColumnDataSource, HoverTool, LinearColorMapper

from tracer.lens import LensResult
from tracer.trace_result import NoiseSpec, TraceResult
from widgets.figures import (edit_comparison, lens_comparison, lens_figure, token_label, trace_grid, trace_heatmap,
                             update_lens_figure, update_trace_heatmap)


def make_trace(kind="hidden", seed=0, n_tok=6, n_layers=5, span=(1, 3)) -> TraceResult:
    rng = np.random.default_rng(seed)
    tokens = ["The", " E", "iff", "el", " is\n", " in"][:n_tok] + [f" t{i}" for i in range(max(0, n_tok - 6))]
    return TraceResult(
        prompt="".join(tokens), subject="Eiffel", tokens=tokens, subject_span=span, kind=kind, window=10 if kind != "hidden" else 1,
        scores=rng.uniform(0.1, 0.8, (n_tok, n_layers)), low_score=0.1, high_score=0.7, answer=" Paris", answer_id=42,
        noise=NoiseSpec(scale=0.3, multiple=3.0), samples=3, seed=1, model="tiny",
    )


def make_lens(seed=0, n_pos=4, n_layers=5) -> LensResult:
    rng = np.random.default_rng(seed)
    probs = rng.uniform(0, 1, (2, n_pos, n_layers))
    return LensResult(
        prompt="a b c d", tokens=["a", " b", " c", " d"][:n_pos], model="tiny",
        top_ids=rng.integers(0, 100, (n_pos, n_layers)),
        top_tokens=[[f"tok{p}{l}" for l in range(n_layers)] for p in range(n_pos)],
        top_probs=rng.uniform(0, 1, (n_pos, n_layers)), target_ids=[7, 9], targets=[" Paris", " Rome"],
        probs=probs, ranks=rng.integers(0, 50, (2, n_pos, n_layers)), label="clean",
    )


def test_token_label():
    assert token_label(" Paris") == "\u2423Paris"
    assert token_label("a\nb") == "a\\nb"
    assert token_label("") == "\u2205"
    assert token_label(" ") == " "


@pytest.mark.parametrize("kind", ["hidden", "mlp", "attn"])
def test_trace_heatmap_matches_result(kind):
    result = make_trace(kind)
    fig = trace_heatmap(result)
    data = fig.select_one({"name": "trace"}).data
    n_tok, n_layers = result.scores.shape
    assert len(data["score"]) == n_tok * n_layers
    for i in range(len(data["score"])):
        t, l = data["row"][i], data["layer"][i]
        assert data["score"][i] == result.scores[t, l]
        assert data["fraction"][i] == pytest.approx((result.scores[t, l] - 0.1) / 0.6)
        assert data["token"][i] == token_label(result.tokens[t])
        assert data["subject"][i] == (1 <= t < 3)
    labels = {i: label.text for i, label in fig.yaxis[0].major_label_overrides.items()}  # PlainText: never TeX
    assert labels == {0: "The", 1: "\u2423E *", 2: "iff *", 3: "el", 4: "\u2423is\\n", 5: "\u2423in"}
    box = fig.select_one({"name": "subject_box"}).data
    assert (box["top"], box["bottom"]) == ([0.5], [2.5])
    mapper = fig.select_one(LinearColorMapper)
    assert mapper.low == result.low_score  # colour scale anchored at the corrupted score
    assert mapper.high == pytest.approx(result.scores.max())
    subtitle = fig.select_one({"name": "trace_subtitle"}).text.text
    assert "Paris" in subtitle and "0.100" in subtitle and "0.700" in subtitle
    tooltips = dict(fig.select_one(HoverTool).tooltips)
    assert set(tooltips) == {"token", "layer", "p(answer)", "gap restored"}


def test_update_trace_heatmap_replaces_data_in_place():
    fig = trace_heatmap(make_trace("hidden", seed=0))
    source = fig.select_one({"name": "trace"})
    other = make_trace("mlp", seed=5, n_tok=8, span=(2, 5))
    update_trace_heatmap(fig, other)
    assert fig.select_one({"name": "trace"}) is source  # same source, new data
    assert source.data["score"] == other.scores.ravel().tolist()
    assert fig.y_range.start == 7.5 and fig.yaxis[0].major_label_overrides[4].text == "\u2423is\\n *"
    assert fig.select_one(LinearColorMapper).palette[0] != fig.select_one(LinearColorMapper).palette[-1]
    assert "MLP" in fig.title.text.text


def test_trace_grid_has_one_heatmap_per_kind():
    grid = trace_grid({k: make_trace(k) for k in ("hidden", "mlp", "attn")})
    names = [child.name for child in grid.children]
    assert names == ["trace_hidden", "trace_mlp", "trace_attn"]


def test_lens_figure_matches_result():
    lens = make_lens()
    layout = lens_figure(lens)
    grid = layout.select_one({"name": "lens_grid"}).data
    assert grid["prob"] == lens.top_probs.ravel().tolist()
    assert grid["top"][7] == "tok12"  # row-major: position 1, layer 2
    curves = layout.select_one({"name": "lens_curves"}).data
    assert curves["target"] == ["\u2423Paris", "\u2423Rome"]
    assert curves["prob"][1] == lens.probs[1, -1].tolist() and curves["rank"][0] == lens.ranks[0, -1].tolist()
    other = make_lens(seed=3)
    update_lens_figure(layout, other, position=1)
    curves = layout.select_one({"name": "lens_curves"}).data
    assert curves["prob"][0] == other.probs[0, 1].tolist()


def test_lens_comparison_one_line_per_lens():
    a, b = make_lens(0), make_lens(1)
    fig = lens_comparison([a, b], target=" Rome")
    data = fig.select_one(ColumnDataSource).data
    assert data["prob"] == [a.probs[1, -1].tolist(), b.probs[1, -1].tolist()]


def test_edit_comparison_matches_checks():
    checks = [
        {"prompt": "The Eiffel Tower is in", "before": {"top1": " Paris", "p_new": 0.01, "p_true": 0.6},
         "after": {"top1": " Rome", "p_new": 0.9, "p_true": 0.05}},
        {"prompt": "The Louvre <b> is in", "group": "neighbour", "before": {"top1": " Paris", "p_new": 0.02, "p_true": 0.5},
         "after": {"top1": " Paris", "p_new": 0.03, "p_true": 0.48}},
    ]
    layout = edit_comparison(checks, new_target=" Rome", true_target=" Paris",
                             generations=[{"prompt": "The Eiffel Tower", "before": "is in Paris", "after": "is in Rome"}])
    data = layout.select_one({"name": "edit_checks"}).data
    assert data["p_new"] == [0.01, 0.9, 0.02, 0.03]
    assert data["p_true"] == [0.6, 0.05, 0.5, 0.48]
    assert data["group"] == ["rewrite", "rewrite", "neighbour", "neighbour"]
    assert data["label"][1] == ("1", "after")
    table = layout.select_one({"name": "edit_table"}).text
    assert "The Louvre &lt;b&gt; is in" in table  # prompts are escaped
    assert "is in Rome" in layout.select_one({"name": "edit_generations"}).text


# ---------------------------------------------------------------- one palette, what an edit changed
def test_one_colour_per_meaning_across_figures():
    """The new answer is vermillion and the true answer blue in every chart; before/after is drawn
    by dash and hatch, never by colour; every heat map of a probability uses one scale."""
    from bokeh.models import MultiLine, VBar

    from widgets.palette import BEFORE_DASH, NEW, SEQUENTIAL, TRUE

    a, b = replace(make_lens(0), label="before the edit"), replace(make_lens(1), label="after the edit")
    comp = lens_comparison([a, b], target=None, new_target=" Rome", true_target=" Paris")
    data = comp.select_one(ColumnDataSource).data
    by_label = dict(zip(data["label"], zip(data["color"], data["dash"])))
    assert by_label["before the edit: \u2423Rome"] == (NEW, BEFORE_DASH)
    assert by_label["after the edit: \u2423Rome"] == (NEW, "solid")
    assert by_label["before the edit: \u2423Paris"][0] == by_label["after the edit: \u2423Paris"][0] == TRUE
    curves = lens_figure(a, new_target=" Rome", true_target=" Paris").select_one({"name": "lens_curves"}).data
    assert dict(zip(curves["target"], curves["color"])) == {"\u2423Paris": TRUE, "\u2423Rome": NEW}
    edit = edit_comparison([{"prompt": "p", "before": {"p_new": 0.1, "p_true": 0.5}, "after": {"p_new": 0.8, "p_true": 0.1}}],
                           new_target=" Rome", true_target=" Paris")
    for name, color in (("edit_new", NEW), ("edit_true", TRUE)):
        glyph = edit.select_one({"name": name}).renderers[0].glyph
        assert isinstance(glyph, VBar) and glyph.fill_color == color
    assert edit.select_one({"name": "edit_checks"}).data["hatch"] == ["/", " "]  # before hatched, after solid
    glyph = comp.renderers[0].glyph
    assert isinstance(glyph, MultiLine) and glyph.line_dash == "dash"
    maps = {k: trace_heatmap(make_trace(k)).select_one(LinearColorMapper).palette for k in ("hidden", "mlp", "attn")}
    assert all(tuple(p) == SEQUENTIAL for p in maps.values())


def test_trace_difference_is_edited_minus_original_share_of_gap():
    from widgets.figures import restored_fraction, trace_difference

    original, edited = make_trace("mlp", seed=0), replace(make_trace("mlp", seed=1), answer=" Rome", low_score=0.2)
    fig = trace_difference(original, edited)
    data = fig.select_one({"name": "trace_diff"}).data
    expected = (edited.scores - 0.2) / (edited.high_score - 0.2) - (original.scores - 0.1) / (0.7 - 0.1)
    np.testing.assert_allclose(data["diff"], expected.ravel())
    np.testing.assert_allclose(data["before"], restored_fraction(original).ravel())
    mapper = fig.select_one({"name": "diff_colors"})
    assert mapper.low == -mapper.high == pytest.approx(-np.abs(expected).max())  # white is "no change"
    with pytest.raises(ValueError, match="not aligned"):
        trace_difference(original, make_trace("mlp", n_tok=7))


def test_trace_comparison_updates_in_place_to_what_a_fresh_one_shows():
    """The edit panel's original | edited | difference row: updating it with another pair (another
    prompt length too) gives the data, colour range and labels of a row built from that pair."""
    from widgets.figures import trace_comparison, update_trace_comparison

    pair = make_trace("mlp", seed=0), replace(make_trace("mlp", seed=1), answer=" Rome")
    other = make_trace("mlp", seed=2, n_tok=8), replace(make_trace("mlp", seed=3, n_tok=8), answer=" Oslo", low_score=0.3)
    row_ = trace_comparison(*pair)
    sources = [f.select_one({"name": n}) for f, n in zip(row_.children, ("trace", "trace", "trace_diff"))]
    update_trace_comparison(row_, *other)
    fresh = trace_comparison(*other)
    for shown, new, name in zip(row_.children, fresh.children, ("trace", "trace", "trace_diff")):
        assert shown.select_one({"name": name}).data == new.select_one({"name": name}).data
        assert shown.title.text.text == new.title.text.text and shown.height == new.height
        labels = lambda f: {k: v.text for k, v in f.yaxis[0].major_label_overrides.items()}  # noqa: E731
        assert labels(shown) == labels(new) and len(labels(shown)) == 8
    assert [f.select_one({"name": n}) for f, n in zip(row_.children, ("trace", "trace", "trace_diff"))] == sources
    diff, new_diff = row_.children[2], fresh.children[2]
    assert diff.select_one({"name": "diff_colors"}).high == new_diff.select_one({"name": "diff_colors"}).high > 0
    assert "p(Oslo) edited" in diff.select_one({"name": "diff_subtitle"}).text.text
    assert row_.children[0].title.text.text.startswith("Original") and row_.children[1].title.text.text.startswith("Edited")
