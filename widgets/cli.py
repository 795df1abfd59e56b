"""``factscope``, the program users run: the engine's commands (:mod:`tracer.cli`) and the UI's.

    factscope trace --prompt "..." --subject "..."        # engine command
    factscope report --out report.html                     # UI command (widgets.commands.report)
    factscope averages runs/known --html averages.html     # engine command + the UI's --html

The top layer of the application: it is the one module that hands the commands drawing HTML or
running notebooks (:mod:`widgets.commands`) to :func:`tracer.cli.main`, so the engine never
imports the UI. ``python -m widgets.cli`` runs the same program.
"""
from __future__ import annotations

import sys

from tracer import cli

from .commands import averages, eval_table, export, health, report

#: the UI's commands, registered after the engine's
COMMANDS = (report, export, averages, eval_table, health)


def build_parser():
    """The full ``factscope`` parser (engine and UI commands)."""
    return cli.build_parser(COMMANDS)


def main(argv: list[str] | None = None) -> int:
    """Run one ``factscope`` command (``argv`` defaults to ``sys.argv[1:]``); returns the exit status."""
    return cli.main(argv, extra_commands=COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
