"""Markdown that shows text as text: the one escaper for table cells factscope writes.

    f"| {cell(model_name)} | {score:.1f} |"
"""
from __future__ import annotations

import re

#: what Markdown (CommonMark/GFM and GitHub's math) could read as syntax in a table cell; parentheses
#: stay as they are, since ``\(`` would open inline math in MathJax renderers
_SPECIAL = re.compile(r"([\\`*_\[\]{}<>#|$~!&])")


def cell(text: object) -> str:
    """``text`` as literal text of a Markdown table cell (one line, punctuation escaped)."""
    return _SPECIAL.sub(r"\\\1", " ".join(str(text).split()))
