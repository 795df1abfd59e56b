"""What tests/test_browser.py needs to check that no figure of a printed report is cut across pages.

Two independent checks of a PDF printed by Chromium:

* :data:`MARK_FIGURES` (run in the page before printing) puts a tiny text marker at the top and at
  the bottom of every figure card (``.fs-figure``); :func:`marker_pages` reads on which page each
  marker was printed. A card cut by a page break has its two markers on different pages.
* :func:`image_boxes`: each canvas is printed as an image. An image cut by a page break would be
  drawn on each page it touches, partly outside the page and clipped to it; :func:`image_boxes`
  walks every page's content stream (form XObjects too), tracks the transformation matrix and
  returns each image's box in PDF points.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from pypdf import PdfReader
from pypdf.generic import ContentStream


@dataclass(frozen=True)
class Box:
    page: int
    x0: float
    y0: float
    x1: float
    y1: float
    page_height: float
    page_width: float

    def inside_page(self, tol: float = 1.0) -> bool:
        return (self.x0 >= -tol and self.y0 >= -tol and self.x1 <= self.page_width + tol
                and self.y1 <= self.page_height + tol)


def _mul(a, b):
    """PDF matrix product a x b of 6-tuples (a b c d e f)."""
    return (a[0] * b[0] + a[1] * b[2], a[0] * b[1] + a[1] * b[3],
            a[2] * b[0] + a[3] * b[2], a[2] * b[1] + a[3] * b[3],
            a[4] * b[0] + a[5] * b[2] + b[4], a[4] * b[1] + a[5] * b[3] + b[5])


def _walk(reader, content, resources, ctm, page_no, media, out, depth=0):
    xobjects = (resources or {}).get("/XObject") if resources else None
    xobjects = xobjects.get_object() if xobjects is not None else {}
    stack = []
    for operands, op in ContentStream(content, reader).operations:
        if op == b"q":
            stack.append(ctm)
        elif op == b"Q":
            ctm = stack.pop() if stack else ctm
        elif op == b"cm":
            ctm = _mul(tuple(float(v) for v in operands), ctm)
        elif op == b"Do":
            xo = xobjects[operands[0]].get_object()
            if xo.get("/Subtype") == "/Image":
                corners = [(ctm[0] * x + ctm[2] * y + ctm[4], ctm[1] * x + ctm[3] * y + ctm[5])
                           for x, y in ((0, 0), (1, 0), (0, 1), (1, 1))]
                xs, ys = [c[0] for c in corners], [c[1] for c in corners]
                out.append(Box(page_no, min(xs), min(ys), max(xs), max(ys), media[1], media[0]))
            elif xo.get("/Subtype") == "/Form" and depth < 8:
                matrix = tuple(float(v) for v in xo.get("/Matrix", (1, 0, 0, 1, 0, 0)))
                _walk(reader, xo, xo.get("/Resources") or resources, _mul(matrix, ctm), page_no, media, out, depth + 1)


def image_boxes(path) -> list[Box]:
    """Every image drawn in the PDF at ``path``, with its page and box (points, origin bottom left)."""
    reader = PdfReader(str(path))
    out: list[Box] = []
    for i, page in enumerate(reader.pages):
        box = page.mediabox
        media = (float(box.width), float(box.height))
        contents = page.get_contents()
        if contents is not None:
            _walk(reader, contents, page.get("/Resources"), (1, 0, 0, 1, 0, 0), i, media, out)
    return out


#: JavaScript for ``page.evaluate``: markers FSTOP<i>X / FSBOT<i>X at the top and bottom of each
#: figure card (absolutely placed: the layout does not move); returns the number of cards
MARK_FIGURES = """() => {
  const cards = [...document.querySelectorAll('.fs-figure')];
  cards.forEach((card, i) => {
    card.style.position = 'relative';
    for (const [where, name] of [['top', 'FSTOP'], ['bottom', 'FSBOT']]) {
      const m = document.createElement('span');
      m.textContent = name + i + 'X';
      m.style.cssText = `position:absolute;left:0;${where}:0;font:5px monospace;color:#fefefe;line-height:5px`;
      card.appendChild(m);
    }
  });
  return cards.length;
}"""


def marker_pages(path) -> dict[str, list[int]]:
    """``{"FSTOP3": [pages], "FSBOT3": [pages], ...}``: the pages (from 0) on which each marker of
    :data:`MARK_FIGURES` was printed."""
    out: dict[str, list[int]] = {}
    for i, page in enumerate(PdfReader(str(path)).pages):
        for name in re.findall(r"(FS(?:TOP|BOT)\d+)X", page.extract_text().replace(" ", "")):
            out.setdefault(name, []).append(i)
    return out


def cut_figures(path, n_cards: int) -> list[str]:
    """The figure cards (of :data:`MARK_FIGURES`) whose top and bottom were printed on different
    pages, or whose markers are missing from the PDF."""
    pages = marker_pages(path)
    return [f"card {i}: top on {pages.get(f'FSTOP{i}')}, bottom on {pages.get(f'FSBOT{i}')}" for i in range(n_cards)
            if len(pages.get(f"FSTOP{i}", [])) != 1 or pages.get(f"FSTOP{i}") != pages.get(f"FSBOT{i}")]
