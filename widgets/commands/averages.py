"""``--html`` of ``factscope averages`` and ``factscope trace-dataset``: the average-effect figures
as a standalone HTML page (:func:`widgets.aggregate_figures.write_html`).

The engine's commands know nothing of HTML: :func:`register` adds the option to their parsers,
checks the path before any work, and sets their ``on_averages`` hook
(:mod:`tracer.commands.averages`) to write the page once the averages are written.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Mapping

from tracer.aggregate import EffectAverages
from tracer.commands import check_output_path

from ..aggregate_figures import write_html

#: the engine commands that get ``--html``
COMMANDS = ("averages", "trace-dataset")


def register(subparsers) -> None:
    for name in COMMANDS:
        parser = subparsers.choices[name]
        parser.add_argument("--html", type=Path, default=None, help="also write the average-effect figures as HTML")
        parser.set_defaults(func=_checking_html(parser.get_default("func")), on_averages=write_figures)


def _checking_html(handler):
    """``handler`` after a check of ``--html`` (its folder exists, it is not a folder), so a long
    run is not lost to a bad path at its end."""

    def run(args: argparse.Namespace) -> int:
        check_output_path(args.html, "--html file")
        return handler(args)

    return run


def write_figures(args: argparse.Namespace, averages: Mapping[str, EffectAverages]) -> None:
    """The ``on_averages`` hook: with ``--html``, write the figures of ``averages`` there."""
    if args.html is None:
        return
    model = next(iter(averages.values())).model
    write_html(averages, args.html, title=f"Average causal effects: {model}")
    print(f"figures -> {args.html}")
