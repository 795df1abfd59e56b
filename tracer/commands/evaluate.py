"""``factscope evaluate``: CounterFact / zsRE metrics of an editing method, as in the papers."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import add_model_arguments, add_ray_arguments, check_ray_arguments, model_runner, parse_layers
from .plan import refuse_too_large
from ..errors import HyperParameterError
from ..evaluate import run_evaluation
from ..evaluate.methods import METHODS, check_overrides, method_spec
from ..evaluate.records import load_cases
from ..evaluate.report import summary_markdown
from ..limits import check_seed


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="CounterFact / zsRE evaluation of none, FT-L, ROME, MEMIT or AlphaEdit",
                              description="Edit each case (or batch), measure the papers' metrics, revert; writes "
                                          "DIR/cases/<id>.json (resumable) and DIR/summary.{json,md,html}. With --ray "
                                          "the cases (ROME, FT-L) or MEMIT's z run on Ray workers; this process "
                                          "writes the files.")
    add_model_arguments(p)
    p.add_argument("--method", required=True, choices=tuple(METHODS),
                   help="an editing method of the registry (tracer.evaluate.methods.METHODS)")
    p.add_argument("--dataset", required=True, choices=("counterfact", "counterfact-10k", "zsre"))
    p.add_argument("--data", type=Path, default=None, help="dataset file (default: the copy in $FACTSCOPE_DATA, else the data folder beside the checkout)")
    p.add_argument("--limit", type=int, default=None, help="first N records only")
    p.add_argument("--batch-size", type=int, default=None,
                   help="edits per MEMIT batch (default: all --limit records; ROME and FT-L always 1)")
    p.add_argument("--layer", type=int, default=None, help="ROME / FT-L layer (default: per architecture)")
    p.add_argument("--layers", type=str, default=None, help="MEMIT / AlphaEdit layers, e.g. 2-6 or 2,3,4 (default: per architecture)")
    p.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE",
                   help="override one hyper-parameter of the method (repeatable), e.g. norm_constraint=5e-3 "
                        "for ft-l, mom2_weight=5000 for memit; VALUE is read as JSON, else as a string")
    p.add_argument("--stats", choices=("cache", "identity"), default="cache",
                   help="key statistics C: cached second moment over Wikipedia (default) or C = I")
    p.add_argument("--no-generation", action="store_true", help="skip generations (fluency GE, consistency RS)")
    p.add_argument("--generation-prompts", type=int, default=None, help="generation prompts per case (default: all 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="output directory (resumed when it exists, with or without --ray)")
    add_ray_arguments(p)
    p.set_defaults(func=run)


def parse_hparams(items: list[str]) -> dict:
    """``["lr=0.01", "layers=[2,3]"]`` -> ``{"lr": 0.01, "layers": (2, 3)}`` (JSON values, lists as tuples)."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise HyperParameterError(f"--hparam must look like KEY=VALUE (e.g. norm_constraint=5e-3); got {item!r}")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        out[key.strip()] = tuple(value) if isinstance(value, list) else value
    return out


def method_options(args: argparse.Namespace) -> dict:
    """``--hparam``, ``--layer``, ``--layers`` and ``--stats`` as options of ``make_method`` (checked)."""
    options = parse_hparams(args.hparam)
    check_overrides(args.method, options)
    if args.layer is not None:
        options["layer"] = args.layer
    if args.layers:
        options["layers"] = parse_layers(args.layers)
    if args.stats == "identity" and args.method in ("rome", "memit", "alphaedit"):
        options["stats"] = "identity"
    return options


def run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise HyperParameterError(f"--limit must be >= 1, got {args.limit}")
    batch = args.batch_size
    if batch is not None and (batch < 1 or (args.method in ("rome", "ft-l") and batch != 1)):  # one edit at a time
        raise HyperParameterError(f"--batch-size must be >= 1, and 1 for {args.method} (one edit at a time); got {batch}")
    if batch is None:
        batch = None if method_spec(args.method).batched else 1  # MEMIT, AlphaEdit: every selected case in one batch
    check_ray_arguments(args)
    options = method_options(args)
    cases = load_cases(args.dataset, args.data, limit=args.limit)  # a bad file is refused before the model loads
    check_seed(args.seed, "--seed")
    if cases:  # generations are seeded with seed + case id
        check_seed(args.seed + max(c.case_id for c in cases), "--seed plus the largest case id")
    if cases:
        size = "layers" if method_spec(args.method).batched else "layer"  # the option the method's plan reads
        sized = {size: options[size]} if size in options and args.method != "none" else {}
        refuse_too_large(args, "evaluate", method=args.method, requests=cases, batch_size=batch,
                         generation=not args.no_generation, workers=args.workers or 1 if args.ray else 1, **sized)
    with model_runner(args) as runner:
        summary = run_evaluation(runner, args.method, args.dataset, args.out, limit=args.limit, batch_size=batch,
                                 cases=cases, data_path=args.data, generation=not args.no_generation,
                                 generation_prompts=args.generation_prompts, seed=args.seed, method_options=options)
    print(summary_markdown([summary]), end="")
    print(f"per-case JSON in {args.out / 'cases'}; summary in {args.out / 'summary.md'}, .json, .html")
    return 0
