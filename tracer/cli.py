"""The engine's command line: one sub-command per module in :mod:`tracer.commands`.

Each command module defines ``register(subparsers)``, which adds its parser and sets
``func=handler``; a handler takes the parsed arguments and returns an exit status.
Bad input (any :class:`~tracer.errors.FactscopeError`) prints one line and exits 2.

The ``factscope`` program users run is :mod:`widgets.cli`: it calls :func:`main` with the
commands that draw HTML or run notebooks (``report``, ``export``, ``--html`` of ``averages`` and
``trace-dataset``) as ``extra_commands``. This module imports nothing from :mod:`widgets`;
``python -m tracer.cli`` is the engine's commands alone.
"""
from __future__ import annotations

import argparse
import logging
import sys
from types import ModuleType
from typing import Sequence

from .commands import (averages, calibrate, defaults, edit, eval_table, evaluate, knowns, layer_sweep, plan, sequential,
                       trace, trace_dataset)
from .errors import FactscopeError

DESCRIPTION = "Locate (causal tracing) and edit (ROME, MEMIT, AlphaEdit) facts in language models."
#: the engine's command modules, in the order ``factscope --help`` lists them
COMMANDS: tuple[ModuleType, ...] = (trace, edit, defaults, calibrate, layer_sweep, knowns, trace_dataset, averages,
                                     evaluate, eval_table, sequential, plan)


def build_parser(extra_commands: Sequence = ()) -> argparse.ArgumentParser:
    """The parser of the engine's commands, then of ``extra_commands``.

    Each extra command is an object with ``register(subparsers)`` (a module), called after the
    engine's commands are registered: it may add a sub-command, or extend an engine command's
    parser through ``subparsers.choices[name]`` (an option, a default such as a hook).
    """
    parser = argparse.ArgumentParser(prog="factscope", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="log diagnostics to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (*COMMANDS, *extra_commands):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None, extra_commands: Sequence = ()) -> int:
    """Run one command (``argv`` defaults to ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser(extra_commands)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except FactscopeError as e:
        print(f"factscope {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"factscope {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
