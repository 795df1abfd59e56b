"""``factscope export``: run notebooks and write HTML files that open offline (see :mod:`widgets.export`)."""
from __future__ import annotations


def register(subparsers) -> None:
    from widgets.export import add_arguments  # noqa: PLC0415 (light: loads no Bokeh, no ipywidgets)

    p = subparsers.add_parser("export", help="execute notebooks and export them to offline HTML (widgets included)",
                              description=__doc__.splitlines()[0].split(": ", 1)[1])
    add_arguments(p)
    p.set_defaults(func=handler)


def handler(args) -> int:
    from widgets.export import run  # noqa: PLC0415

    return run(args)
