"""The figure of a layer sweep (:class:`tracer.layer_sweep.LayerSweep`): where the trace peaks
against where the edit works.

    fig = layer_sweep_figure(sweep)       # trace effect (scaled to its peak) and the edit's scores per layer

A pure builder: the sweep in, a Bokeh figure out; every text literal (:mod:`widgets.text`). The
data source is named ``layer-sweep`` so tests and panels can find it.
"""
from __future__ import annotations

from bokeh.models import ColumnDataSource, HoverTool, Range1d
from bokeh.palettes import Category10
from bokeh.plotting import figure

from tracer.layer_sweep import LayerSweep

from .text import literal_models

#: the lines: data column, legend label
LINES = (("effect", "MLP trace effect (÷ its peak)"), ("rewrite_score", "rewrite score"),
         ("paraphrase_score", "paraphrase score"), ("neighborhood_success", "neighbourhood score (NS)"),
         ("rewrite_gen_success", "greedy text says it (ES-g)"))


def layer_sweep_data(sweep: LayerSweep) -> dict[str, list]:
    """Columns of :func:`layer_sweep_figure`: ``layer``, the scaled trace effect and each score."""
    effect = sweep.effect_at()
    peak = max(max(sweep.effect), 1e-12)
    data = {"layer": list(sweep.layers), "effect": [e / peak for e in effect], "effect_raw": effect}
    for key, _ in LINES[1:]:
        data[key] = sweep.column(key)
    return data


@literal_models
def layer_sweep_figure(sweep: LayerSweep, *, width: int = 560, height: int = 320) -> figure:
    """One line per score over the swept layers, and the trace's MLP effect at the last subject token."""
    prompt = sweep.case.get("prompt", "{}").replace("{}", sweep.case.get("subject", ""), 1)
    fig = figure(title=f"{prompt} → {sweep.case.get('target_new', '')}: edited at each layer ({sweep.model})",
                 width=width, height=height, x_axis_label="layer edited (ROME)", y_axis_label="score",
                 y_range=Range1d(-0.05, 1.05), tools="pan,box_zoom,wheel_zoom,reset,save", name="layer-sweep-figure")
    src = ColumnDataSource(layer_sweep_data(sweep), name="layer-sweep")
    colors = Category10[10]
    for i, (key, label) in enumerate(LINES):
        dash = "dashed" if key == "effect" else "solid"
        fig.line(x="layer", y=key, source=src, line_color=colors[i], line_width=2, line_dash=dash, legend_label=label)
        fig.scatter(x="layer", y=key, source=src, color=colors[i], size=5)
    fig.add_tools(HoverTool(tooltips=[("layer", "@layer"), ("trace effect", "@effect_raw{0.000}"),
                                      ("rewrite score", "@rewrite_score{0.00}"), ("paraphrase", "@paraphrase_score{0.00}"),
                                      ("NS", "@neighborhood_success{0.00}")]))
    fig.legend.location = "top_right"
    fig.legend.label_text_font_size = "8pt"
    return fig
