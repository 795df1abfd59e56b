"""``factscope knowns``: write the facts of a known_1000-format file that a model answers correctly."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..datapaths import KNOWNS, data_file
from ..errors import HyperParameterError
from ..knowns import filter_known, load_facts
from . import add_model_arguments, load_model_from_args


def register(subparsers) -> None:
    p = subparsers.add_parser("knowns", help="filter facts to those the model answers correctly",
                              description="Keep the facts whose attribute's first token is the model's greedy "
                                          "next token; the rule is recorded in the output file.")
    p.add_argument("--facts", type=Path, default=None,
                   help="known_1000.json-format file (default: known_1000.json in $FACTSCOPE_DATA, else in "
                        "the data folder beside the checkout, when only its owner can write there)")
    p.add_argument("--out", type=Path, required=True, help="output JSON ({'filter': ..., 'facts': [...]})")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per forward pass (default 32)")
    add_model_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise HyperParameterError(f"--batch-size must be >= 1, got {args.batch_size}")
    facts = data_file(KNOWNS, args.facts)
    load_facts(facts)  # a missing or malformed file is refused before the model loads
    lm = load_model_from_args(args)
    known = filter_known(lm, facts, batch_size=args.batch_size)
    known.save(args.out)
    print(f"{known.n_known} of {known.n_checked} facts known by {known.model} -> {args.out}")
    print(f"rule: {known.rule}")
    return 0
