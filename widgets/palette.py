"""The one palette of every factscope figure: each colour means one thing, all colour-blind safe.

    from widgets.palette import NEW, TRUE, target_color, SEQUENTIAL, DIVERGING, BEFORE_DASH
    fig.line(..., line_color=target_color(" Rome", new=" Rome", true=" Paris"), line_dash=BEFORE_DASH)

Categorical colours are Okabe & Ito's set (distinct under the common colour-vision deficiencies);
continuous scales are single-hue (purple) or a brown-teal diverging map, readable by lightness alone
and in grey print. The rules every builder keeps:

* a colour names a **thing**, never a stage: the edit's new answer is always vermillion
  (:data:`NEW`), the old/true answer always blue (:data:`TRUE`), whatever the chart;
* **before / after** the edit is drawn by line style and fill, never by colour: before dashed
  (:data:`BEFORE_DASH`) or a light hatched bar (:data:`BEFORE_ALPHA`, :data:`BEFORE_HATCH`),
  after solid;
* every heat map of probabilities (traces of every kind, the logit lens) uses :data:`SEQUENTIAL`,
  white (nothing) to dark purple (most); differences (edited minus original) use :data:`DIVERGING`,
  brown (lower after the edit), white (no change), teal (higher);
* in dataset averages the colour is the **token bucket** (:data:`BUCKET_COLORS`) and the line
  style the intervention (:data:`SEVERED_DASH`), so one bucket keeps its colour in every chart.
  Bucket colours avoid :data:`NEW` and :data:`TRUE`.
"""
from __future__ import annotations

from bokeh.palettes import BrBG, Purples256

#: Okabe & Ito's colour-blind safe set, by name
OKABE_ITO = {"black": "#000000", "orange": "#E69F00", "sky": "#56B4E9", "green": "#009E73", "yellow": "#F0E442",
             "blue": "#0072B2", "vermillion": "#D55E00", "purple": "#CC79A7", "grey": "#999999"}

NEW = OKABE_ITO["vermillion"]   #: the edit's new answer (" Rome"), in every chart
TRUE = OKABE_ITO["blue"]        #: the true / old answer (" Paris"), in every chart
#: further targets a user asks for (the panels' layer-by-layer view), after NEW and TRUE
OTHER_TARGETS = (OKABE_ITO["orange"], OKABE_ITO["green"], OKABE_ITO["purple"], OKABE_ITO["sky"], OKABE_ITO["black"])
INK = "#222222"                 #: outlines (the subject's box), text drawn on charts
NEUTRAL = "#6b6b6b"             #: checks that are neither the new nor the true answer

#: before the edit: dashed lines, light hatched bars; after: solid lines and bars
BEFORE_DASH, AFTER_DASH = "dashed", "solid"
BEFORE_ALPHA, AFTER_ALPHA = 0.35, 1.0
BEFORE_HATCH, AFTER_HATCH = "/", " "

#: heat maps of a probability: white (none) to dark purple (the most)
SEQUENTIAL = tuple(reversed(Purples256))
#: heat maps of a difference after - before: brown (lower), white (same), teal (higher)
DIVERGING = tuple(reversed(BrBG[11]))

#: the six token buckets of dataset averages (tracer.aggregate.BUCKETS), never NEW or TRUE
BUCKET_COLORS = {"first_subject": OKABE_ITO["orange"], "middle_subject": OKABE_ITO["sky"],
                 "last_subject": OKABE_ITO["green"], "first_after": OKABE_ITO["purple"],
                 "further": OKABE_ITO["grey"], "last": OKABE_ITO["black"]}
#: the intervention of a severed trace, drawn as line style in its bucket's colour
SEVERED_DASH = {"hidden": "solid", "hidden-severed-mlp": "dashed", "hidden-severed-attn": "dotted"}


def same_token(a: str, b: str | None) -> bool:
    """Whether token ``a`` names answer ``b``: the same text (``" Rome"`` and ``"Rome"``) or its
    first token (``" R"`` of ``" Rome"`` where the tokenizer splits it; the lens scores that token)."""
    a, b = a.strip(), (b or "").strip()
    return a != "" and (a == b or b.startswith(a))


def target_color(target: str, *, new: str | None = None, true: str | None = None, index: int = 0) -> str:
    """The colour of ``target``: :data:`NEW` if it is the edit's new answer, :data:`TRUE` if it is
    the true answer, else the ``index``-th of :data:`OTHER_TARGETS`."""
    exact = [c for c, answer in ((NEW, new), (TRUE, true)) if answer is not None and target.strip() == answer.strip()]
    if exact:
        return exact[0]
    if same_token(target, new):
        return NEW
    if same_token(target, true):
        return TRUE
    return OTHER_TARGETS[index % len(OTHER_TARGETS)]


def target_colors(targets, *, new: str | None = None, true: str | None = None) -> list[str]:
    """:func:`target_color` of each target; targets that are neither new nor true take the
    further colours in their order."""
    out, others = [], 0
    for t in targets:
        color = target_color(t, new=new, true=true, index=others)
        others += color not in (NEW, TRUE)
        out.append(color)
    return out

#: evaluation metrics: the new answer on the edited prompt (efficacy) and on paraphrases
#: (generalisation) in the new answer's colours; the true answer kept on neighbours (specificity) blue
METRIC_COLORS = {"efficacy": NEW, "generalization": OKABE_ITO["orange"], "specificity": TRUE}
