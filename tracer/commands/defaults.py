"""``factscope defaults``: which ROME / MEMIT / FT-L settings apply to a model, and why."""
from __future__ import annotations

import argparse
import json

from . import add_model_arguments, load_model_from_args
from ..edit.defaults import defaults_for


def register(subparsers) -> None:
    p = subparsers.add_parser("defaults", help="show the editing defaults that apply to a model, with their evidence",
                              description="Defaults follow the model's identity (architecture and dimensions), "
                                          "not its name: this prints the identity, the settings and where they come from.")
    add_model_arguments(p)
    p.add_argument("--json", action="store_true", help="print the defaults as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    choice = defaults_for(load_model_from_args(args))
    print(json.dumps(choice.to_dict(), indent=1) if args.json else choice.describe())
    return 0
