"""``factscope export``: run notebooks and write HTML files that open offline (see :mod:`widgets.export`)."""
from __future__ import annotations

from ..export import add_arguments, run


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="execute notebooks and export them to offline HTML (widgets included)",
                              description=__doc__.splitlines()[0].split(": ", 1)[1])
    add_arguments(p)
    p.set_defaults(func=run)
