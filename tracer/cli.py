"""``factscope`` command line: one sub-command per module in :mod:`tracer.commands`.

Each command module defines ``register(subparsers)``, which adds its parser and sets
``func=handler``; a handler takes the parsed arguments and returns an exit status.
Bad input (any :class:`~tracer.errors.FactscopeError`) prints one line and exits 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import FactscopeError

#: command modules, in the order ``factscope --help`` lists them
COMMANDS = ("trace", "edit", "report", "export", "knowns", "trace_dataset", "averages", "evaluate", "eval_table")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="factscope", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log diagnostics to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"tracer.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"tracer.commands.{name}":
                continue  # command not built in this version
            raise
        module.register(sub)
    return parser



def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
