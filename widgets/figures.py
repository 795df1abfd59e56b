"""Pure figure builders: factscope results -> Bokeh figures (no computation, no widgets).

    fig = trace_heatmap(result)             # a TraceResult: tokens x layers
    update_trace_heatmap(fig, other)        # same figure, new data (what the panels do)
    grid = trace_grid(trace_all_results)    # the three kinds side by side
    lens = lens_figure(lens_result)         # top token per (position, layer) + target curves
    edit = edit_comparison(checks)          # before/after probabilities and generations
    diff = trace_difference(original, edited)  # what an edit changed in a trace, aligned
    pair = trace_comparison(original, edited)  # original | edited | difference, one row

Colours come from :mod:`widgets.palette` (one meaning per colour, colour-blind safe): the new
answer is always vermillion, the true answer blue, "before the edit" is dashed or hatched.

Every builder names its data sources (``source.name``), so panels and tests can find them with
``fig.select_one({"name": ...})`` and update ``source.data`` in place. Every text a builder or
updater shows (titles, tick labels, tables) is literal: :mod:`widgets.text` turns off TeX on
all of it (``@literal_models``), and updaters assign :func:`widgets.text.plain` texts directly.
"""
from __future__ import annotations

import html
from typing import Mapping, Sequence

import numpy as np
from bokeh.layouts import column, row
from bokeh.models import (BasicTicker, ColorBar, ColumnDataSource, FactorRange, FixedTicker, HoverTool,
                          LinearColorMapper, PlainText, Range1d, TapTool, Title)
from bokeh.plotting import figure

from tracer.lens import LensResult
from tracer.trace_result import TraceResult

from .palette import (AFTER_ALPHA, AFTER_DASH, AFTER_HATCH, BEFORE_ALPHA, BEFORE_DASH, BEFORE_HATCH, DIVERGING, INK,
                      NEW, SEQUENTIAL, TRUE, target_colors)
from .text import html_div, literal_models, plain

#: the colour map of every kind: one scale, white (corrupted score) to dark (highest restored score)
PALETTES = {"hidden": SEQUENTIAL, "mlp": SEQUENTIAL, "attn": SEQUENTIAL}
KIND_TITLES = {"hidden": "single restored layer", "mlp": "restored MLP", "attn": "restored attention"}
CELL = 18  # pixels per heat-map cell
TICK_FONT = "12px"  # token tick labels: readable on a phone and in print


def token_label(token: str) -> str:
    """A token as shown on an axis: visible leading space, escaped control characters."""
    text = token.replace("\n", "\\n").replace("\t", "\\t")
    return "\u2423" + text[1:] if text.startswith(" ") and text.strip() else (text or "\u2205")


def _row_labels(tokens: Sequence[str], span: tuple[int, int] | None) -> dict[int, PlainText]:
    """Tick labels of the token rows, as plain text (a token such as ``$$`` is not TeX)."""
    start, end = span if span else (0, 0)
    return {i: plain(token_label(t) + (" *" if start <= i < end else "")) for i, t in enumerate(tokens)}


# ---------------------------------------------------------------------------------------- trace
def trace_heatmap_data(result: TraceResult) -> dict[str, list]:
    """Column data of :func:`trace_heatmap`: one entry per (token, layer) cell, row-major."""
    scores = np.asarray(result.scores, dtype=float)
    n_tok, n_layers = scores.shape
    gap = result.high_score - result.low_score
    tok, layer = np.meshgrid(np.arange(n_tok), np.arange(n_layers), indexing="ij")
    start, end = result.subject_span
    fraction = (scores - result.low_score) / gap if gap != 0 else np.zeros_like(scores)
    return {
        "row": tok.ravel().tolist(),
        "layer": layer.ravel().tolist(),
        "token": [token_label(result.tokens[t]) for t in tok.ravel()],
        "score": scores.ravel().tolist(),
        "fraction": fraction.ravel().tolist(),
        "subject": [bool(start <= t < end) for t in tok.ravel()],
    }


def _trace_title(result: TraceResult) -> str:
    what = KIND_TITLES.get(result.kind, result.kind)
    if result.kind != "hidden":
        what += f" (window {result.window})"
    if result.severed:
        what += f", later {result.severed} severed"
    return what


def _trace_subtitle(result: TraceResult) -> str:
    return (f"p({result.answer.strip() or result.answer!r}): corrupted {result.low_score:.3f} \u2192 "
            f"clean {result.high_score:.3f}")


@literal_models
def trace_heatmap(result: TraceResult, *, width: int | None = None) -> figure:
    """Heat map of a causal trace: tokens as rows (subject rows marked ``*`` and boxed), layers as
    columns; colour from the corrupted score (lightest) to the highest score; hover shows token,
    layer, probability of the answer and the fraction of the clean-corrupted gap restored."""
    n_tok, n_layers = result.scores.shape
    source = ColumnDataSource(data=trace_heatmap_data(result), name="trace")
    mapper = LinearColorMapper(palette=PALETTES.get(result.kind, PALETTES["hidden"]), name="trace_colors")
    fig = figure(
        title=_trace_title(result), x_range=Range1d(-0.5, n_layers - 0.5), y_range=Range1d(n_tok - 0.5, -0.5),
        width=width or max(360, 150 + CELL * n_layers), height=110 + CELL * n_tok,
        tools="tap,save,reset", toolbar_location="above", name=f"trace_{result.kind}",
        css_classes=["fs-trace", f"fs-trace-{result.kind}"],
    )
    cells = fig.rect(x="layer", y="row", width=1, height=1, source=source, line_color=None,
                     fill_color={"field": "score", "transform": mapper}, name="cells",
                     nonselection_fill_alpha=1.0, selection_line_color="black")
    box_source = ColumnDataSource(data=_subject_box(result), name="subject_box")
    fig.quad(left="left", right="right", top="top", bottom="bottom", source=box_source,
             fill_alpha=0, line_color=INK, line_width=1.5, line_dash="dashed")
    fig.add_tools(HoverTool(renderers=[cells], tooltips=[
        ("token", "@token"), ("layer", "@layer"), ("p(answer)", "@score{0.0000}"),
        ("gap restored", "@fraction{0.0%}")]))
    fig.select_one(TapTool).renderers = [cells]
    fig.add_layout(ColorBar(color_mapper=mapper, width=10, ticker=BasicTicker(desired_num_ticks=5)), "right")
    fig.add_layout(Title(text="", text_font_style="normal", text_font_size="11px", name="trace_subtitle"), "above")
    fig.xaxis.axis_label = f"layer ({KIND_TITLES.get(result.kind, result.kind)})"
    fig.grid.visible = False
    fig.outline_line_color = None
    fig.xaxis.ticker = BasicTicker(desired_num_ticks=min(10, n_layers), num_minor_ticks=0)
    fig.yaxis.major_label_text_font_size = TICK_FONT
    _set_trace_axes(fig, mapper, result)
    return fig


def _subject_box(result: TraceResult) -> dict[str, list]:
    start, end = result.subject_span
    n_layers = result.scores.shape[1]
    return {"left": [-0.5], "right": [n_layers - 0.5], "top": [start - 0.5], "bottom": [end - 0.5]}


def _set_trace_axes(fig: figure, mapper: LinearColorMapper, result: TraceResult) -> None:
    high = float(np.max(result.scores))
    mapper.low = float(result.low_score)
    mapper.high = high if high > result.low_score else float(result.low_score) + 1e-6
    n_tok = len(result.tokens)
    fig.yaxis.ticker = FixedTicker(ticks=list(range(n_tok)))
    fig.yaxis.major_label_overrides = _row_labels(result.tokens, result.subject_span)
    fig.title.text = plain(_trace_title(result))
    fig.select_one({"name": "trace_subtitle"}).text = plain(_trace_subtitle(result))


@literal_models
def update_trace_heatmap(fig: figure, result: TraceResult) -> None:
    """Show ``result`` in a figure made by :func:`trace_heatmap`, updating its sources in place."""
    n_tok, n_layers = result.scores.shape
    fig.select_one({"name": "trace"}).data = trace_heatmap_data(result)
    fig.select_one({"name": "subject_box"}).data = _subject_box(result)
    fig.x_range.update(start=-0.5, end=n_layers - 0.5)
    fig.y_range.update(start=n_tok - 0.5, end=-0.5)
    fig.height = 110 + CELL * n_tok
    mapper = fig.select_one({"name": "trace_colors"})
    mapper.palette = PALETTES.get(result.kind, PALETTES["hidden"])
    _set_trace_axes(fig, mapper, result)


@literal_models
def trace_grid(results: Mapping[str, TraceResult] | Sequence[TraceResult]):
    """The traces of :func:`tracer.trace.trace_all` side by side (hidden, mlp, attn)."""
    items = list(results.values()) if isinstance(results, Mapping) else list(results)
    return row(*[trace_heatmap(r) for r in items], name="trace_grid")


def restored_fraction(result: TraceResult) -> np.ndarray:
    """``[token, layer]`` share of the clean-corrupted gap each restoration recovers (0 where the
    gap is zero): comparable between two traces even when they score different answers."""
    gap = result.high_score - result.low_score
    return (np.asarray(result.scores, dtype=float) - result.low_score) / gap if gap != 0 else \
        np.zeros_like(result.scores, dtype=float)


def trace_difference_data(original: TraceResult, edited: TraceResult) -> dict[str, list]:
    """Column data of :func:`trace_difference`: one entry per (token, layer) cell, row-major."""
    if original.scores.shape != edited.scores.shape or list(original.tokens) != list(edited.tokens):
        raise ValueError(f"the traces are not aligned: {original.scores.shape[0]} tokens x {original.n_layers} layers "
                         f"vs {edited.scores.shape[0]} x {edited.n_layers}; trace the same prompt on both models")
    before, after = restored_fraction(original), restored_fraction(edited)
    n_tok, n_layers = before.shape
    tok, layer = np.meshgrid(np.arange(n_tok), np.arange(n_layers), indexing="ij")
    return {"row": tok.ravel().tolist(), "layer": layer.ravel().tolist(),
            "token": [token_label(original.tokens[t]) for t in tok.ravel()],
            "before": before.ravel().tolist(), "after": after.ravel().tolist(),
            "diff": (after - before).ravel().tolist()}


@literal_models
def trace_difference(original: TraceResult, edited: TraceResult, *, width: int | None = None) -> figure:
    """What an edit changed in a causal trace: per cell, the share of the gap restored in the
    edited model's trace minus the original's (teal: restores more after the edit, brown: less),
    on the same token rows and layer columns as :func:`trace_heatmap`."""
    n_tok, n_layers = original.scores.shape
    mapper = LinearColorMapper(palette=DIVERGING, low=-1e-6, high=1e-6, name="diff_colors")
    source = ColumnDataSource(data=trace_difference_data(original, edited), name="trace_diff")
    fig = figure(title="", x_range=Range1d(-0.5, n_layers - 0.5), y_range=Range1d(n_tok - 0.5, -0.5),
                 width=width or max(360, 150 + CELL * n_layers), height=110 + CELL * n_tok, tools="save,reset",
                 toolbar_location="above", name=f"trace_diff_{original.kind}",
                 css_classes=["fs-trace-diff", f"fs-trace-diff-{original.kind}"])
    cells = fig.rect(x="layer", y="row", width=1, height=1, source=source, line_color=None,
                     fill_color={"field": "diff", "transform": mapper})
    fig.quad(left="left", right="right", top="top", bottom="bottom",
             source=ColumnDataSource(_subject_box(original), name="diff_subject_box"),
             fill_alpha=0, line_color=INK, line_width=1.5, line_dash="dashed")
    fig.add_tools(HoverTool(renderers=[cells], tooltips=[
        ("token", "@token"), ("layer", "@layer"), ("gap restored, original", "@before{0.0%}"),
        ("gap restored, edited", "@after{0.0%}"), ("difference", "@diff{+0.0%}")]))
    fig.add_layout(ColorBar(color_mapper=mapper, width=10, ticker=BasicTicker(desired_num_ticks=5)), "right")
    fig.add_layout(Title(text="", text_font_style="normal", text_font_size="11px", name="diff_subtitle"), "above")
    fig.xaxis.ticker = BasicTicker(desired_num_ticks=min(10, n_layers), num_minor_ticks=0)
    fig.yaxis.major_label_text_font_size = TICK_FONT
    fig.grid.visible = False
    fig.outline_line_color = None
    _set_difference(fig, original, edited)
    return fig


def _set_difference(fig: figure, original: TraceResult, edited: TraceResult) -> None:
    """Titles, axes, colour range and subject box of a :func:`trace_difference` figure."""
    diff = fig.select_one({"name": "trace_diff"}).data["diff"]
    span = float(np.nanmax(np.abs(diff))) if len(diff) else 0.0
    span = span if np.isfinite(span) and span > 0 else 1e-6
    mapper = fig.select_one({"name": "diff_colors"})
    mapper.low, mapper.high = -span, span
    n_tok = len(original.tokens)
    fig.title.text = plain(f"Edited minus original: {KIND_TITLES.get(original.kind, original.kind)}")
    fig.select_one({"name": "diff_subtitle"}).text = plain(
        f"share of the gap restored: p({edited.answer.strip()}) edited vs p({original.answer.strip()}) original")
    fig.xaxis.axis_label = f"layer ({KIND_TITLES.get(original.kind, original.kind)})"
    fig.yaxis.ticker = FixedTicker(ticks=list(range(n_tok)))
    fig.yaxis.major_label_overrides = _row_labels(original.tokens, original.subject_span)


@literal_models
def update_trace_difference(fig: figure, original: TraceResult, edited: TraceResult) -> None:
    """Show another pair of traces in a figure made by :func:`trace_difference`, in place."""
    n_tok, n_layers = original.scores.shape
    fig.select_one({"name": "trace_diff"}).data = trace_difference_data(original, edited)
    fig.select_one({"name": "diff_subject_box"}).data = _subject_box(original)
    fig.x_range.update(start=-0.5, end=n_layers - 0.5)
    fig.y_range.update(start=n_tok - 0.5, end=-0.5)
    fig.height = 110 + CELL * n_tok
    _set_difference(fig, original, edited)


def _comparison_titles(first: figure, second: figure, original: TraceResult, edited: TraceResult) -> None:
    first.title.text = plain(f"Original: {_trace_title(original)}")
    second.title.text = plain(f"Edited: {_trace_title(edited)}")


@literal_models
def trace_comparison(original: TraceResult, edited: TraceResult):
    """The edited model's trace next to the original's, and their difference (:func:`trace_difference`):
    a row of three figures named ``original_<kind>``, ``edited_<kind>``, ``trace_diff_<kind>``."""
    first, second = trace_heatmap(original), trace_heatmap(edited)
    first.name, second.name = f"original_{original.kind}", f"edited_{edited.kind}"
    _comparison_titles(first, second, original, edited)
    return row(first, second, trace_difference(original, edited), name=f"trace_comparison_{original.kind}")


@literal_models
def update_trace_comparison(layout, original: TraceResult, edited: TraceResult) -> None:
    """Show another pair of traces in a row made by :func:`trace_comparison`, updating it in place."""
    first, second, diff = layout.children
    update_trace_heatmap(first, original)
    update_trace_heatmap(second, edited)
    update_trace_difference(diff, original, edited)
    _comparison_titles(first, second, original, edited)


# ----------------------------------------------------------------------------------------- lens
def lens_grid_data(lens: LensResult) -> dict[str, list]:
    """Column data of the top-token grid: one entry per (position, layer)."""
    n_pos, n_layers = lens.top_probs.shape
    pos, layer = np.meshgrid(np.arange(n_pos), np.arange(n_layers), indexing="ij")
    return {
        "row": pos.ravel().tolist(),
        "layer": layer.ravel().tolist(),
        "token": [token_label(lens.tokens[p]) for p in pos.ravel()],
        "top": [token_label(lens.top_tokens[p][l]) for p, l in zip(pos.ravel(), layer.ravel())],
        "prob": lens.top_probs.ravel().tolist(),
    }


def lens_curve_data(lens: LensResult, position: int = -1, *, new_target: str | None = None,
                    true_target: str | None = None) -> dict[str, list]:
    """Column data of the target curves at ``position``: one line per target, coloured by
    :func:`widgets.palette.target_colors` (the new answer vermillion, the true one blue)."""
    pos = position % len(lens.tokens)
    layers = list(range(lens.n_layers))
    return {
        "xs": [layers for _ in lens.targets],
        "prob": [lens.probs[i, pos].tolist() for i in range(len(lens.targets))],
        "rank": [lens.ranks[i, pos].tolist() for i in range(len(lens.targets))],
        "target": [token_label(t) for t in lens.targets],
        "color": target_colors(lens.targets, new=new_target, true=true_target),
    }


@literal_models
def lens_figure(lens: LensResult, *, position: int = -1, width: int | None = None, new_target: str | None = None,
                true_target: str | None = None):
    """Layer-by-layer view: the top decoded token at each (position, layer), coloured by its
    probability, and below it the probability of each chosen target at ``position`` across
    layers (hover: rank). ``new_target``/``true_target`` give those targets their colours
    (:mod:`widgets.palette`). Returns a column layout named ``lens``."""
    n_pos, n_layers = lens.top_probs.shape
    width = width or max(420, 150 + 34 * n_layers)
    source = ColumnDataSource(data=lens_grid_data(lens), name="lens_grid")
    mapper = LinearColorMapper(palette=SEQUENTIAL[:200], low=0.0, high=1.0)
    grid = figure(title=f"Layer-by-layer top token ({lens.label})", x_range=Range1d(-0.5, n_layers - 0.5),
                  y_range=Range1d(n_pos - 0.5, -0.5), width=width, height=110 + 22 * n_pos,
                  tools="save,reset", toolbar_location="above", name="lens_top", css_classes=["fs-lens"])
    cells = grid.rect(x="layer", y="row", width=1, height=1, source=source, line_color="white",
                      fill_color={"field": "prob", "transform": mapper})
    grid.text(x="layer", y="row", text="top", source=source, text_align="center", text_baseline="middle",
              text_font_size="7pt", text_color=INK)
    grid.add_tools(HoverTool(renderers=[cells], tooltips=[
        ("position", "@token"), ("layer", "@layer"), ("top token", "@top"), ("p", "@prob{0.000}")]))
    grid.add_layout(ColorBar(color_mapper=mapper, width=10), "right")
    grid.yaxis.ticker = FixedTicker(ticks=list(range(n_pos)))
    grid.yaxis.major_label_overrides = _row_labels(lens.tokens, None)
    grid.yaxis.major_label_text_font_size = TICK_FONT
    grid.xaxis.axis_label = "layer"
    grid.grid.visible = False

    curves = ColumnDataSource(data=lens_curve_data(lens, position, new_target=new_target, true_target=true_target),
                              name="lens_curves")
    lines = figure(title=_lines_title(lens, position),
                   x_range=grid.x_range, y_range=Range1d(0, 1), width=width, height=260,
                   tools="save,reset", toolbar_location="above", name="lens_lines")
    multi = lines.multi_line(xs="xs", ys="prob", source=curves, line_color="color", line_width=2,
                             legend_field="target")
    lines.add_tools(HoverTool(renderers=[multi], tooltips=[("token", "@target")]))
    lines.legend.location = "top_left"
    lines.xaxis.axis_label = "layer"
    lines.yaxis.axis_label = "probability"
    return column(grid, lines, name="lens")


@literal_models
def update_lens_figure(layout, lens: LensResult, *, position: int = -1, new_target: str | None = None,
                       true_target: str | None = None) -> None:
    """Show ``lens`` in a layout made by :func:`lens_figure`, updating its sources in place."""
    n_pos, n_layers = lens.top_probs.shape
    grid = layout.select_one({"name": "lens_top"})
    lines = layout.select_one({"name": "lens_lines"})
    layout.select_one({"name": "lens_grid"}).data = lens_grid_data(lens)
    layout.select_one({"name": "lens_curves"}).data = lens_curve_data(lens, position, new_target=new_target,
                                                                      true_target=true_target)
    grid.x_range.update(start=-0.5, end=n_layers - 0.5)
    grid.y_range.update(start=n_pos - 0.5, end=-0.5)
    grid.height = 110 + 22 * n_pos
    grid.yaxis.ticker = FixedTicker(ticks=list(range(n_pos)))
    grid.yaxis.major_label_overrides = _row_labels(lens.tokens, None)
    grid.title.text = plain(f"Layer-by-layer top token ({lens.label})")
    lines.title.text = plain(_lines_title(lens, position))


def _lines_title(lens: LensResult, position: int) -> str:
    label = token_label(lens.tokens[position % len(lens.tokens)])
    return f"Probability of chosen tokens after each layer, at position {label!r} ({lens.label})"


@literal_models
def lens_comparison(lenses: Sequence[LensResult], *, target: str | int | Sequence[str | int] | None = 0,
                    position: int = -1, width: int = 520, new_target: str | None = None,
                    true_target: str | None = None) -> figure:
    """Probability of targets at ``position`` across layers, one line per (lens, target) on one
    chart: the colour is the target (:mod:`widgets.palette`: the new answer vermillion, the true
    one blue), the line style the lens (the first dashed, e.g. before the edit; the last solid);
    legend entries read ``"<lens label>: <target>"``. ``target``: a row of
    :attr:`LensResult.probs` (int), a target's text, a list of them, or None for every target."""
    fig = figure(title="Layer by layer", width=width, height=300, y_range=Range1d(0, 1),
                 tools="save,reset", toolbar_location="above", name="lens_comparison")
    data = {"xs": [], "prob": [], "label": [], "color": [], "dash": []}
    wanted = list(range(len(lenses[0].targets))) if target is None and lenses else (
        list(target) if isinstance(target, (list, tuple)) else [target])
    for i, lens in enumerate(lenses):
        colors = target_colors(lens.targets, new=new_target, true=true_target)
        dash = AFTER_DASH if i == len(lenses) - 1 else BEFORE_DASH if i == 0 else "dotted"
        for want in wanted:
            t = want if isinstance(want, int) else lens.target_index(want)
            data["xs"].append(list(range(lens.n_layers)))
            data["prob"].append(lens.probs[t, position % len(lens.tokens)].tolist())
            data["label"].append(f"{lens.label}: {token_label(lens.targets[t])}")
            data["color"].append(colors[t])
            data["dash"].append(dash)
    source = ColumnDataSource(data=data, name="lens_comparison")
    fig.multi_line(xs="xs", ys="prob", source=source, line_color="color", line_dash="dash", line_width=2.5,
                   legend_field="label")
    fig.legend.location = "top_left"
    fig.legend.label_text_font_size = "12px"
    fig.legend.background_fill_alpha = 0.8
    fig.xaxis.axis_label = "layer"
    fig.yaxis.axis_label = "probability"
    return fig


# ----------------------------------------------------------------------------------------- edit
def _as_rows(checks) -> tuple[list[Mapping], list[Mapping]]:
    """``(prompt checks, generations)`` from an ``EditCheck``, its ``to_dict()`` or a list of checks."""
    if hasattr(checks, "to_dict"):
        checks = checks.to_dict()
    if isinstance(checks, Mapping):
        return list(checks["prompts"]), list(checks.get("generations", []))
    return list(checks), []


def _kind(c: Mapping, i: int) -> str:
    return str(c.get("group") or c.get("kind") or ("rewrite" if i == 0 else "check"))


def edit_comparison_data(checks) -> dict[str, list]:
    """Column data of :func:`edit_comparison`: two rows (before, after) per checked prompt."""
    rows = {"label": [], "prompt": [], "group": [], "stage": [], "p_new": [], "p_true": [], "top1": [], "alpha": [],
            "hatch": []}
    for i, c in enumerate(_as_rows(checks)[0]):
        for stage in ("before", "after"):
            s = c[stage]
            rows["label"].append((f"{i + 1}", stage))
            rows["prompt"].append(c["prompt"])
            rows["group"].append(_kind(c, i))
            rows["stage"].append(stage)
            rows["p_new"].append(float(s["p_new"]))
            rows["p_true"].append(float(s["p_true"]) if s.get("p_true") is not None else float("nan"))
            rows["top1"].append(token_label(str(s.get("top1", ""))))
            rows["alpha"].append(BEFORE_ALPHA if stage == "before" else AFTER_ALPHA)
            rows["hatch"].append(BEFORE_HATCH if stage == "before" else AFTER_HATCH)
    return rows


def _p(value) -> str:
    return "\u2013" if value is None else f"{float(value):.3f}"


def _checks_table(checks: Sequence[Mapping]) -> str:
    body = "".join(
        f"<tr><td>{i + 1}</td><td>{html.escape(_kind(c, i))}</td><td>{html.escape(c['prompt'])}</td>"
        f"<td>{html.escape(str(c['before'].get('top1', '')))}</td><td>{html.escape(str(c['after'].get('top1', '')))}</td>"
        f"<td class='fs-num'>{_p(c['before'].get('p_new'))} \u2192 {_p(c['after'].get('p_new'))}</td>"
        f"<td class='fs-num'>{_p(c['before'].get('p_true'))} \u2192 {_p(c['after'].get('p_true'))}</td></tr>"
        for i, c in enumerate(checks))
    return (TABLE_CSS + "<div class='fs-scroll'><table class='fs-table'><tr><th>#</th><th>kind</th><th>prompt</th>"
            "<th>top-1 before</th><th>top-1 after</th><th>P(new) before \u2192 after</th>"
            f"<th>P(true) before \u2192 after</th></tr>{body}</table></div>")


def _generations_table(generations: Sequence[Mapping]) -> str:
    if not generations:
        return ""
    body = "".join(f"<tr><td>{html.escape(g['prompt'])}</td><td>{html.escape(g['before'])}</td>"
                   f"<td>{html.escape(g['after'])}</td></tr>" for g in generations)
    return (TABLE_CSS + "<b style='font:bold 13px sans-serif'>Greedy generations</b><div class='fs-scroll'>"
            f"<table class='fs-table'><tr><th>prompt</th><th>before</th><th>after</th></tr>{body}</table></div>")


def _edit_titles(new_target: str, true_target: str) -> tuple[str, str]:
    return f"P({new_target.strip()}): the new answer", f"P({true_target.strip()}): the true answer"


@literal_models
def edit_comparison(checks, *, new_target: str = "new", true_target: str = "true",
                    generations: Sequence[Mapping] = (), width: int = 640):
    """Before/after comparison of an edit.

    ``checks``: an ``EditCheck`` (or its ``to_dict()``), or a list
    ``[{"prompt", "kind"?, "before": {"top1", "p_new", "p_true"}, "after": {...}}]`` with the
    rewrite prompt first (the ``checks`` of ``factscope edit --json``).
    ``generations``: ``[{"prompt", "before", "after"}]`` greedy continuations.
    Returns a column: P(new) and P(true) bars per prompt, a prompt table, generations.
    """
    if hasattr(checks, "target_new"):
        new_target, true_target = checks.target_new, checks.target_true
    rows, gens = _as_rows(checks)
    generations = list(generations) or gens
    data = edit_comparison_data(rows)
    source = ColumnDataSource(data=data, name="edit_checks")
    factors = list(dict.fromkeys(data["label"]))
    hover = [("prompt", "@prompt"), ("kind", "@group"), ("stage", "@stage"), ("top-1", "@top1"),
             ("p(new)", "@p_new{0.000}"), ("p(true)", "@p_true{0.000}")]
    figs = []
    for field, title, name, color in zip(("p_new", "p_true"), _edit_titles(new_target, true_target),
                                         ("edit_new", "edit_true"), (NEW, TRUE)):
        fig = figure(title=title, x_range=FactorRange(*factors), y_range=Range1d(0, 1), width=width // 2 + 40,
                     height=280, tools="save,reset", toolbar_location="above", name=name)
        bars = fig.vbar(x="label", top=field, width=0.8, source=source, fill_color=color, fill_alpha="alpha",
                        hatch_pattern="hatch", hatch_color=color, hatch_alpha=0.9, line_color=color,
                        legend_field="stage")
        fig.legend.location = "top_right"
        fig.legend.orientation = "horizontal"
        fig.legend.label_text_font_size = "11px"
        fig.legend.background_fill_alpha = 0.8
        fig.add_tools(HoverTool(renderers=[bars], tooltips=hover))
        fig.xaxis.major_label_orientation = 0.9
        fig.xgrid.visible = False
        figs.append(fig)
    table = html_div(_checks_table(rows), width=width, name="edit_table")
    gen = html_div(_generations_table(generations), width=width, name="edit_generations")
    return column(row(*figs), table, gen, name="edit")


@literal_models
def update_edit_comparison(layout, checks, *, new_target: str = "new", true_target: str = "true",
                           generations: Sequence[Mapping] = ()) -> None:
    """Show other checks in a layout made by :func:`edit_comparison`, updating it in place."""
    if hasattr(checks, "target_new"):
        new_target, true_target = checks.target_new, checks.target_true
    rows, gens = _as_rows(checks)
    data = edit_comparison_data(rows)
    layout.select_one({"name": "edit_checks"}).data = data
    factors = list(dict.fromkeys(data["label"]))
    for name, title in zip(("edit_new", "edit_true"), _edit_titles(new_target, true_target)):
        fig = layout.select_one({"name": name})
        fig.x_range.factors = factors
        fig.title.text = plain(title)
    layout.select_one({"name": "edit_table"}).text = _checks_table(rows)
    layout.select_one({"name": "edit_generations"}).text = _generations_table(list(generations) or gens)


TABLE_CSS = ("<style>.fs-table{border-collapse:collapse;font:12px sans-serif}.fs-table td,.fs-table th"
             "{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top;overflow-wrap:normal}"
             ".fs-num{white-space:nowrap;font-variant-numeric:tabular-nums}.fs-scroll{max-width:100%;overflow-x:auto}"
             "</style>")
