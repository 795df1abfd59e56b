"""The one page template of every factscope report: summary first, figures, provenance last.

    page = Page(title="factscope: The Eiffel Tower -> Rome", summary=html_div(summary_html),
                sections=[Section("Where the fact is recalled", "traces", [Row(figs, 3)], how_to_read="...")],
                provenance={"Settings": settings, "Versions": library_versions()})
    page.html()        # one offline HTML string (BokehJS inlined)
    page.layout()      # the same content as one Bokeh column (tests, notebooks)

The trace/edit report (:mod:`widgets.report`), the dataset-averages page
(:mod:`widgets.aggregate_figures`) and the evaluation page (:mod:`widgets.eval_page`) are all
a :class:`Page`. In the HTML, text (summary, headings, tables) is ordinary document flow and each
figure is its own Bokeh root inside a ``<figure>`` card, so that

* the page reflows: figures stretch to their card (``sizing_mode="stretch_width"``) and the
  cards sit in CSS grids that collapse to one column on narrow screens, so nothing scrolls
  sideways at 1280 px or on a 390 px phone (a wide table scrolls inside its own box);
* it prints: each section starts a new page, no figure or table row is split across pages
  (``break-inside: avoid``), toolbars are hidden;
* every text stays literal: the HTML blocks are Divs built by the caller with every datum
  escaped (:func:`widgets.text.html_div`), and every figure passes :func:`widgets.text.literal`.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Mapping, Sequence, Union

from bokeh.embed import components
from bokeh.embed.bundle import bundle_for_objs_and_resources
from bokeh.layouts import column, row
from bokeh.model import Model
from bokeh.models import Div, LayoutDOM, Plot
from bokeh.resources import INLINE

from .text import html_div, literal


@dataclass(frozen=True)
class Figure:
    """One figure card: a Bokeh figure or layout, and an optional one-line caption. ``wide``:
    the card spans the section's full width (set ``min_width`` on the model to keep cells
    readable; the card then scrolls sideways inside itself on a phone, never the page)."""

    model: LayoutDOM
    caption: str = ""
    wide: bool = False


@dataclass(frozen=True)
class Row:
    """Figure cards aligned in ``columns`` columns (one column on a narrow screen)."""

    figures: Sequence[Figure]
    columns: int = 3


Block = Union[Figure, Row, Div]


@dataclass(frozen=True)
class Section:
    """A titled part of the page. ``how_to_read``: two short lines for a classroom (plain text),
    shown above the figures; ``blocks``: figures, rows of figures and HTML blocks (Divs)."""

    title: str
    name: str
    blocks: Sequence[Block]
    how_to_read: str = ""


@dataclass(frozen=True)
class Page:
    """A report page. ``summary``: a Div of escaped HTML (what was found, in words and numbers);
    ``provenance``: group title -> {key: value}, shown last as tables (settings, model, versions)."""

    title: str
    summary: Div
    sections: Sequence[Section] = ()
    provenance: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    subtitle: str = ""
    name: str = "page"

    # --------------------------------------------------------------------------- Bokeh view
    def _header_html(self) -> str:
        sub = f"<p class='fs-sub'>{html.escape(self.subtitle)}</p>" if self.subtitle else ""
        return f"<h1>{html.escape(self.title)}</h1>{sub}"

    def _section_html(self, section: Section) -> str:
        read = (f"<p class='fs-read'><b>How to read this:</b> {html.escape(section.how_to_read)}</p>"
                if section.how_to_read else "")
        return f"<h2>{html.escape(section.title)}</h2>{read}"

    def _provenance_divs(self) -> list[Div]:
        out = [html_div("<h2>Provenance</h2>", name="provenance")]
        for group, items in self.provenance.items():
            out.append(html_div(f"<h3>{html.escape(group)}</h3>{kv_table(items)}", name=_slug(group)))
        return out

    def layout(self):
        """The page as one Bokeh column (header, summary, each section's heading and figures,
        provenance), every text literal; names: ``<section>_heading``, ``summary``, ``provenance``."""
        parts: list[LayoutDOM] = [html_div(self._header_html(), name=f"{self.name}_header"), self.summary]
        for s in self.sections:
            parts.append(html_div(self._section_html(s), name=f"{s.name}_heading"))
            for b in s.blocks:
                if isinstance(b, Row):
                    parts.append(row(*[f.model for f in b.figures]))
                elif isinstance(b, Figure):
                    parts.append(b.model)
                else:
                    parts.append(b)
        parts += self._provenance_divs()
        return literal(column(*parts, name=self.name))

    # ----------------------------------------------------------------------------- HTML view
    def html(self) -> str:
        """The page as one standalone HTML string: BokehJS and its CSS inlined (no network),
        the page's CSS, one Bokeh root per figure."""
        models: dict[str, Model] = {}

        def card(f: Figure) -> str:
            key = f"fig{len(models)}"
            models[key] = _stretch(literal(f.model))
            cap = f"<figcaption class='fs-cap'>{html.escape(f.caption)}</figcaption>" if f.caption else ""
            return (f"<figure class='fs-figure{' fs-wide' if f.wide else ''}' data-name='{html.escape(f.model.name or '')}'>"
                    f"<div class='fs-plot'>{_marker(key)}</div>{cap}</figure>")

        body = [f"<header class='fs-header'>{self._header_html()}</header>",
                f"<section class='fs-summary' id='summary'>{literal(self.summary).text}</section>"]
        for s in self.sections:
            inner = []
            for b in s.blocks:
                if isinstance(b, Row):
                    inner.append(f"<div class='fs-grid fs-cols-{b.columns}'>{''.join(card(f) for f in b.figures)}</div>")
                elif isinstance(b, Figure):
                    inner.append(card(b))
                else:
                    inner.append(f"<div class='fs-block'>{literal(b).text}</div>")
            body.append(f"<section class='fs-section' id='{html.escape(s.name)}'>{self._section_html(s)}"
                        f"{''.join(inner)}</section>")
        body.append("<section class='fs-provenance' id='provenance'>"
                    + "".join(d.text for d in self._provenance_divs()) + "</section>")
        script, divs = components(models) if models else ("", {})
        # the JavaScript this page's models need (Bokeh leaves out e.g. its MathJax bundle when no text is TeX)
        bokeh_js, bokeh_css = bundle_for_objs_and_resources(list(models.values()) or None, INLINE)
        text = "".join(body)
        for key, div in divs.items():
            text = text.replace(_marker(key), div, 1)
        return (f"<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
                f"<meta name='viewport' content='width=device-width, initial-scale=1'>\n"
                f"<title>{html.escape(self.title)}</title>\n{bokeh_js}\n{bokeh_css}\n<style>{PAGE_CSS}</style>\n</head>\n"
                f"<body>\n<main class='fs-page'>{text}</main>\n{script}\n<script>{PRINT_JS}</script>\n</body>\n</html>\n")


def kv_table(items: Mapping[str, object]) -> str:
    """A two-column table of ``items``, every key and value escaped."""
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in items.items())
    return f"<div class='fs-scroll'><table class='fs-table fs-kv'>{rows}</table></div>"


def _marker(key: str) -> str:
    """Where a figure's root goes: a comment no escaped datum can contain (``<`` is escaped)."""
    return f"<!--fs-root:{key}-->"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_") or "group"


def _stretch(model: LayoutDOM) -> LayoutDOM:
    """Make a figure or layout follow its card's width (heights stay), for the HTML page."""
    for m in model.select({"type": LayoutDOM}):
        m.sizing_mode = "stretch_width"
        if isinstance(m, Plot):
            m.toolbar.autohide = True
    return model


#: the page's CSS: readable type, cards in grids that collapse on narrow screens, print rules
PAGE_CSS = """
*,*::before,*::after{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;background:#fff;color:#1f1f1f;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif}
.fs-page{max-width:1200px;margin:0 auto;padding:18px 24px 48px;overflow-wrap:anywhere}
h1{font-size:1.65rem;line-height:1.25;margin:.2em 0 .1em}
h2{font-size:1.25rem;margin:0 0 .4em;padding-bottom:4px;border-bottom:1px solid #ddd}
h3{font-size:1rem;margin:1em 0 .3em}
.fs-sub{color:#555;margin:0 0 1em}
.fs-summary{border:1px solid #d9e2ec;border-left:6px solid #0072B2;border-radius:6px;background:#f5f8fb;
  padding:12px 18px;margin:12px 0 8px}
.fs-summary h2{border:0;margin-bottom:.2em}
.fs-summary ul{margin:.3em 0 .6em;padding-left:1.3em}
.fs-verdict{font-size:1.1rem;font-weight:600;margin:.2em 0 .5em}
.fs-section{margin-top:32px}
.fs-read{margin:.2em 0 .9em;color:#333;max-width:70em}
.fs-grid{display:grid;gap:18px 20px;margin:8px 0 16px}
.fs-cols-1{grid-template-columns:minmax(0,1fr)}
.fs-cols-2{grid-template-columns:repeat(2,minmax(0,1fr))}
.fs-cols-3{grid-template-columns:repeat(3,minmax(0,1fr))}
.fs-figure{margin:0 0 16px;min-width:0;break-inside:avoid;page-break-inside:avoid}
.fs-grid .fs-figure{margin:0}
.fs-plot{width:100%;max-width:100%;overflow-x:auto;overflow-y:hidden}
.fs-cap{font-size:.88rem;color:#444;margin-top:4px}
.fs-block{margin:8px 0 16px;max-width:100%}
.fs-scroll{max-width:100%;overflow-x:auto}
.fs-table{border-collapse:collapse;font-size:13px;margin:4px 0}
.fs-table td,.fs-table th{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
.fs-num{white-space:nowrap;font-variant-numeric:tabular-nums}
.fs-new{color:#D55E00;font-weight:600}.fs-true{color:#0072B2;font-weight:600}
.fs-ok{color:#007a56}.fs-bad{color:#b3261e}
.fs-provenance{margin-top:40px;font-size:.88rem;color:#333}
.fs-provenance h2{font-size:1.05rem}
@media (max-width:980px){.fs-cols-3{grid-template-columns:repeat(auto-fit,minmax(min(100%,320px),1fr))}}
@media (max-width:700px){.fs-cols-2,.fs-cols-3{grid-template-columns:minmax(0,1fr)}
  .fs-page{padding:12px 12px 32px}h1{font-size:1.35rem}}
@page{size:A4;margin:12mm}
@media print{
  body{font-size:11pt}
  .fs-page{max-width:none;padding:0}
  .fs-section,.fs-provenance{break-before:page;page-break-before:always;margin-top:0}
  h2,h3{break-after:avoid;page-break-after:avoid}
  .fs-figure,.fs-summary,.fs-kv,tr,.fs-read{break-inside:avoid;page-break-inside:avoid}
  .fs-grid,.fs-cols-2,.fs-cols-3{grid-template-columns:minmax(0,1fr)}
  .fs-plot{overflow:visible;zoom:var(--fs-print-zoom,1)}
}
"""

#: printing: each figure keeps the size it was drawn at on screen (its canvas is not redrawn for
#: the printer), so a figure wider than a printed page (A4 or Letter less 12 mm margins: 700 CSS
#: px) is zoomed down to fit; measured on screen before printing, applied by the print CSS only
PRINT_JS = """(function () {
  var PRINT_WIDTH = 700;
  function fit() {
    document.querySelectorAll('.fs-plot').forEach(function (p) {
      var w = p.scrollWidth;
      p.style.setProperty('--fs-print-zoom', w > PRINT_WIDTH ? (PRINT_WIDTH / w).toFixed(4) : '1');
    });
  }
  var timer = null;
  function later() { clearTimeout(timer); timer = setTimeout(fit, 200); }
  window.addEventListener('beforeprint', fit);
  window.addEventListener('load', later);
  window.addEventListener('resize', later);
  if (window.ResizeObserver) {
    var ro = new ResizeObserver(later);
    document.querySelectorAll('.fs-plot').forEach(function (p) { ro.observe(p); });
  }
})();"""
