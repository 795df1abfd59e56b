"""Text in Bokeh models is data, never markup: the one place that makes it so.

    fig = literal(figure(title=user_text))      # every text of fig and its children shows literally
    div = html_div(f"<b>{html.escape(prompt)}</b>")   # hand-built HTML (escaped by the caller), no TeX
    fig.title.text = plain(answer)              # an update keeps the text literal

Bokeh interprets strings as TeX through MathJax in two ways (Bokeh 3.9's source, checked):

* a string in a ``TextLike`` property (titles, axis labels, tick-label overrides, colour-bar
  titles, labels) is split by ``parse_delimited_string`` at ``$$…$$``, ``\\[…\\]``, ``\\(…\\)``
  and drawn as TeX; a :class:`~bokeh.models.PlainText` is drawn as it is;
* a :class:`~bokeh.models.Div` / :class:`~bokeh.models.Paragraph` runs MathJax over its text
  (the same delimiters; ``\\href{javascript:…}`` becomes a live link; HTML escaping does not
  stop it) unless ``disable_math`` is set.

Data-source columns (tooltip values, legend fields, ``text`` glyphs, categorical factors) are
drawn as plain text (tooltip values HTML-escaped). :func:`literal` walks a model and everything
it references and neutralises both; it refuses models that interpret text and cannot be told
not to (Markdown, TeX glyphs, math text models, sliders with a TeX-looking title).
The figure builders apply it to what they return (:func:`literal_models`) and the pages and
panels apply it once more to everything they show, so a new figure cannot forget it.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import bokeh.models
from bokeh.core.property.container import Dict, List, Seq, Tuple
from bokeh.core.property.nullable import Nullable
from bokeh.core.property.text_like import TextLike
from bokeh.model import Model
from bokeh.models import AbstractSlider, Div, MathText, MathTextGlyph, PlainText
from bokeh.models.widgets.markups import Markup

M = TypeVar("M")
F = TypeVar("F", bound=Callable[..., Any])

#: models that always interpret their text as TeX or Markdown (Markdown is in newer Bokehs only)
INTERPRETING = tuple(m for m in (getattr(bokeh.models, "Markdown", None), MathText, MathTextGlyph) if m is not None)
#: the delimiters either TeX path recognises (Bokeh's ``find_tex`` turns off MathJax's
#: environments, references and escapes, checked in a browser)
TEX_DELIMITERS = ("$$", "\\[", "\\]", "\\(", "\\)")


def plain(text: str) -> PlainText:
    """``text`` for a title, axis label or tick label, drawn exactly as written (no TeX)."""
    return PlainText(text=str(text))


def html_div(html: str, **kwargs) -> Div:
    """A :class:`Div` of hand-built HTML with TeX processing off. Escape every datum in ``html``
    (``html.escape``) before: the Div renders HTML."""
    return Div(text=html, disable_math=True, **kwargs)


def _text_like(prop) -> bool:
    """Whether a property type is (or holds) ``TextLike``, e.g. ``Nullable(TextLike)``."""
    if isinstance(prop, TextLike):
        return True
    if isinstance(prop, (Nullable, Dict, List, Seq, Tuple)):
        return any(_text_like(p) for p in prop.type_params)
    return False


def _as_plain(value):
    if isinstance(value, str):
        return plain(value)
    if isinstance(value, dict):
        return {k: _as_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_as_plain(v) for v in value)
    return value


def _neutralise(model: Model) -> None:
    if isinstance(model, INTERPRETING):
        raise TypeError(f"{type(model).__name__} renders its text as markup or TeX; show user text with "
                        "widgets.text.html_div (escaped) or a plain-text title instead")
    if isinstance(model, Markup):
        if not model.disable_math:
            model.disable_math = True
        return
    if isinstance(model, AbstractSlider) and model.title and any(d in model.title for d in TEX_DELIMITERS):
        raise TypeError(f"a slider title is rendered as TeX and cannot be made literal: {model.title!r}")
    for name in model.properties():
        if not _text_like(model.lookup(name).property):
            continue
        value = getattr(model, name)
        converted = _as_plain(value)
        if converted is not value and converted != value:
            setattr(model, name, converted)


def literal(obj: M) -> M:
    """Make every text of ``obj`` (a Bokeh model or layout) and of every model it references
    render as literal text; returns ``obj``. Idempotent; other values pass through unchanged."""
    if isinstance(obj, Model):
        for model in obj.references():
            _neutralise(model)
    return obj


def literal_models(fn: F) -> F:
    """Decorator for figure builders and updaters: :func:`literal` on the models passed in and on
    the model returned."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        for arg in args:
            literal(arg)
        return literal(out)

    return wrapper  # type: ignore[return-value]
