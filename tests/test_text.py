"""widgets/text.py, and literal text on every page: no user, dataset or model text becomes TeX or HTML.

:func:`math_exposures` walks every Bokeh model of a document independently of widgets.text and
lists each text Bokeh would hand to MathJax (Bokeh 3.9's rules: ``TextLike`` strings are split at
``$$…$$``, ``\\[…\\]``, ``\\(…\\)``; Div/Paragraph text is typeset unless ``disable_math``).
The other test modules use it on the report, the averages page and the panels' figures.
"""
from __future__ import annotations

import html
import json
import math
from html.parser import HTMLParser

import pytest
from bokeh.embed import file_html
from bokeh.layouts import column
from bokeh.models import (ColorBar, ColumnDataSource, Div, FactorRange, LinearColorMapper, Markdown, MathText,
                          MathTextGlyph, Paragraph, PlainText, Slider, TeXGlyph)
from bokeh.models.widgets.markups import Markup
from bokeh.plotting import figure
from bokeh.resources import INLINE

from tracer.evaluate.report import summary_html, summary_markdown
from widgets.text import html_div, literal, plain

#: what `factscope report --prompt` was shown to turn into a live javascript: link (issue 15)
HOSTILE = r"$$\href{javascript:document.title=1}{\Huge\text{click}}$$"
#: the same attack in every delimiter form, plus HTML, right-to-left text and a control character
HOSTILE_TEXTS = (HOSTILE, r"\(\style{color:red}{x}\)", r"\[\href{javascript:alert(1)}{y}\]",
                 "$x$ <script>alert(1)</script> <b>&amp;</b> \u202eevil\x07")
DELIMITERS = ("$$", "\\(", "\\)", "\\[", "\\]")


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def math_exposures(obj) -> list[str]:
    """``"Model.property: text"`` for every text in ``obj`` (a Bokeh model or layout) and the
    models it references that Bokeh could render as TeX. Exempt: PlainText, Div/Paragraph with
    ``disable_math``, data-source columns (glyphs, legends and tooltips draw them as text;
    tooltip values HTML-escaped), categorical factors (tick labels drawn as plain text boxes)
    and model names (identifiers, never drawn)."""
    out = []
    for m in obj.references():
        if isinstance(m, (MathText, MathTextGlyph, Markdown)):
            out.append(f"{type(m).__name__} (always TeX or markup)")
            continue
        for name, value in m.properties_with_values(include_defaults=True).items():
            if isinstance(m, PlainText) and name == "text":
                continue
            if isinstance(m, Markup) and name == "text" and m.disable_math:
                continue
            if isinstance(m, ColumnDataSource) and name == "data":
                continue
            if name in ("name", "tags", "css_classes"):  # identifiers, never drawn
                continue
            if isinstance(m, FactorRange) and name == "factors":  # CategoricalTickFormatter: TextBox, no TeX
                continue
            for s in _strings(value):
                if any(d in s for d in DELIMITERS):
                    out.append(f"{type(m).__name__}.{name}: {s[:70]!r}")
    return out


def texts(obj) -> str:
    """Every text of a Bokeh document joined (PlainText, titles, Divs, data columns): where to
    look for the user's strings, shown literally."""
    parts = []
    for m in obj.references():
        for value in m.properties_with_values(include_defaults=False).values():
            parts.extend(_strings(value))
    return "\n".join(parts)


# ------------------------------------------------------------------------------- widgets.text
def test_literal_neutralises_every_tex_path():
    fig = figure(title=HOSTILE, x_axis_label=HOSTILE)
    fig.yaxis.major_label_overrides = {0: HOSTILE, 1: "plain"}
    fig.add_layout(ColorBar(color_mapper=LinearColorMapper(palette=["red", "blue"]), title=HOSTILE), "right")
    layout = column(fig, Div(text=html.escape(HOSTILE)), Paragraph(text=HOSTILE))
    assert len(math_exposures(layout)) == 6  # title, axis label, tick label, colour-bar title, Div, Paragraph
    assert literal(layout) is layout
    assert math_exposures(layout) == []
    assert fig.title.text.text == HOSTILE and fig.xaxis[0].axis_label.text == HOSTILE  # same text, now plain
    assert fig.yaxis[0].major_label_overrides[0].text == HOSTILE
    assert all(isinstance(label, PlainText) for label in fig.yaxis[0].major_label_overrides.values())
    before = {m.id for m in layout.references()}
    literal(layout)
    assert {m.id for m in layout.references()} == before  # idempotent: nothing replaced twice


def test_categorical_token_labels_are_plain():
    """Tokens as categorical factors are drawn as plain text boxes; their overrides become PlainText
    and nothing on the page asks for MathJax."""
    tokens = ["$$", "\\href{javascript:document.title=1}{x}", "$$ ", "\\(", "\\)"]
    fig = figure(x_range=FactorRange(*tokens), title=HOSTILE)
    fig.vbar(x=tokens, top=[1, 2, 3, 4, 5])
    fig.xaxis.major_label_overrides = {tokens[1]: tokens[1]}
    literal(fig)
    assert math_exposures(fig) == [] and list(fig.x_range.factors) == tokens
    assert "bokeh-mathjax" not in file_html(fig, resources=INLINE, title="t")


def test_literal_refuses_models_that_always_interpret_text():
    for model in (Markdown(text="x"), column(Div(text="a"), Slider(start=0, end=1, value=0, title=HOSTILE))):
        with pytest.raises(TypeError):
            literal(model)
    fig = figure()
    fig.add_glyph(ColumnDataSource({"x": [0], "y": [0], "t": ["a"]}), TeXGlyph(x="x", y="y", text="t"))
    with pytest.raises(TypeError, match="TeX"):
        literal(fig)
    literal(Slider(start=0, end=1, value=0, title="threshold"))  # a plain title is fine


def test_helpers():
    div = html_div("<b>x</b>", name="d")
    assert div.disable_math and div.name == "d" and div.text == "<b>x</b>"
    assert plain(HOSTILE).text == HOSTILE


# --------------------------------------------------------------------- the evaluation page
class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)

    def handle_data(self, data):
        self.text.append(data)


def _summary(method: str, model: str, dataset: str = "counterfact") -> dict:
    return {"date": "2025-01-01", "n_cases": 2, "seconds_per_edit": 1.5,
            "settings": {"method": method, "dataset": dataset, "model": model, "batch_size": 2},
            "pre": {"S": {"mean": 10.0, "std": math.nan}, "ES": {"mean": 20.0, "std": 1.0}},
            "post": {"S": {"mean": 90.0, "std": math.nan}, "ES": {"mean": 95.0, "std": 2.0}}}


def test_evaluation_page_shows_hostile_names_as_text():
    """The evaluation page has no script at all (so no MathJax) and every name stays text."""
    summaries = [_summary(HOSTILE_TEXTS[3], HOSTILE), _summary(HOSTILE_TEXTS[1], HOSTILE_TEXTS[2])]
    page = summary_html(summaries, title=HOSTILE_TEXTS[3] + "</title><script>alert(2)</script>")
    parser = _Tags()
    parser.feed(page)
    assert parser.tags == {"html", "head", "meta", "title", "style", "body", "h1", "p", "table", "tr", "th", "td",
                           "h3", "pre"}
    shown = "".join(parser.text)
    for text in (HOSTILE_TEXTS[1], HOSTILE_TEXTS[3], "</title><script>alert(2)</script>", json.dumps(HOSTILE)):
        assert text in shown  # method names in the table and headings, models in the settings JSON
    assert page.count("<title>") == 1 and page.count("</title>") == 1


def test_evaluation_markdown_escapes_names():
    """Markdown renderers (GitHub renders $…$ and $$…$$ as math) see escaped punctuation; a pipe
    cannot add a column."""
    md = summary_markdown([_summary("memit", "a|b"), _summary("rome|x $$y$$ <i>z</i> *w*", HOSTILE)])
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert len({line.count("|") - line.count("\\|") for line in rows}) == 1  # every row has the same columns
    assert "| rome\\|x \\$\\$y\\$\\$ \\<i\\>z\\</i\\> \\*w\\* | 2 |" in md
    assert "| memit (batch 2) | 2 | 90.0 | 95.0 ± 2.0 |" in md
    assert "$$" not in md.replace("\\$\\$", "") and "<i>" not in md
    assert "model a\\|b" in md
