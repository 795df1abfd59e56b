"""``factscope sequential``: a dataset edited batch after batch, guarded by the model's health, resumable."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import HyperParameterError
from ..evaluate.records import DATASETS, load_cases
from ..evaluate.sequence import SEQUENTIAL_METHODS, Guard, run_sequence
from ..limits import check_seed
from . import add_model_arguments, load_model_from_args
from .evaluate import method_options
from .plan import refuse_too_large

#: exit status when the guard stopped the run (the offending batch reverted)
GUARD_STOPPED = 3


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sequential", help="ROME / MEMIT / AlphaEdit over a dataset, batch after batch, guarded and resumable",
        description="Edit the first --limit records of a dataset in batches, each on the model the earlier ones "
                    "edited. After each batch read the model's health (norm growth of each edited matrix, perplexity "
                    "on held-out text, n-gram entropy of sampled text, retention of a sample of earlier edits); at the "
                    "first batch that crosses a --max-*/--min-* threshold stop, revert that batch and name it (exit "
                    f"status {GUARD_STOPPED}). Writes DIR/ledger.safetensors after every batch, DIR/health.json and "
                    "DIR/run.json; the same command resumes after the last kept batch.")
    add_model_arguments(p)
    p.add_argument("--method", required=True, choices=SEQUENTIAL_METHODS)
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--data", type=Path, default=None, help="dataset file (default: the copy in $FACTSCOPE_DATA)")
    p.add_argument("--limit", type=int, default=None, help="first N records only")
    p.add_argument("--batch-size", type=int, default=None, help="edits per batch (default 100; ROME: 1)")
    p.add_argument("--layer", type=int, default=None, help="ROME layer (default: per architecture)")
    p.add_argument("--layers", type=str, default=None, help="MEMIT / AlphaEdit layers, e.g. 2-6 (default: per architecture)")
    p.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE",
                   help="override one hyper-parameter (repeatable), e.g. nullspace_threshold=0.01 for alphaedit")
    p.add_argument("--stats", choices=("cache", "identity"), default="cache", help="key statistics C (default: cached)")
    p.add_argument("--max-norm-growth", type=float, default=None, help="stop when ‖W‖/‖W₀‖ of an edited matrix exceeds this (e.g. 1.1)")
    p.add_argument("--max-perplexity-rise", type=float, default=None,
                   help="stop when perplexity on held-out text rises by more than this share (e.g. 0.1 = +10%%)")
    p.add_argument("--max-entropy-drop", type=float, default=None,
                   help="stop when the n-gram entropy of sampled text falls by more than this share (e.g. 0.05)")
    p.add_argument("--min-retention", type=float, default=None,
                   help="stop when fewer than this share of sampled earlier edits still hold (e.g. 0.8)")
    p.add_argument("--retention-sample", type=int, default=32, help="earlier edits re-checked after each batch")
    p.add_argument("--entropy-prompts", type=int, default=8, help="texts sampled for the entropy reading")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", type=Path, required=True, help="output directory (the same one resumes)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise HyperParameterError(f"--limit must be >= 1, got {args.limit}")
    batch = args.batch_size if args.batch_size is not None else (1 if args.method == "rome" else 100)
    if batch < 1:
        raise HyperParameterError(f"--batch-size must be >= 1, got {batch}")
    options = method_options(args)
    guard = Guard(max_norm_growth=args.max_norm_growth, max_perplexity_rise=args.max_perplexity_rise,
                  max_entropy_drop=args.max_entropy_drop, min_retention=args.min_retention)
    check_seed(args.seed, "--seed")
    cases = load_cases(args.dataset, args.data, limit=args.limit)  # a bad file is refused before the model loads
    if not args.out.parent.is_dir():
        raise HyperParameterError(f"--out {str(args.out)!r}: directory {str(args.out.parent)!r} does not exist")
    if cases:  # one batch at a time: the job's peak is one batch's (the ledger adds one copy of each edited matrix)
        size = "layers" if args.method != "rome" else "layer"
        sized = {size: options[size]} if size in options else {}
        refuse_too_large(args, "evaluate", method=args.method, requests=cases[:batch], batch_size=batch,
                         generation=False, **sized)
    lm = load_model_from_args(args)
    result = run_sequence(lm, args.method, cases, batch_size=batch, out_dir=args.out, guard=guard, method_options=options,
                          entropy_prompts=args.entropy_prompts, retention_sample=args.retention_sample, seed=args.seed,
                          progress=not args.no_progress)
    print("| batch | edits | max ‖W‖/‖W₀‖ | perplexity | entropy | efficacy | retention |")
    print("|---|---|---|---|---|---|---|")
    for h in result.health:
        cells = [h.batch, h.n_edits, f"{max(h.norm_ratio.values()):.4f}", f"{h.perplexity:.3f}",
                 "–" if h.entropy is None else f"{h.entropy:.3f}", "–" if h.efficacy is None else f"{h.efficacy:.2f}",
                 "–" if h.retention is None else f"{h.retention:.2f}"]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if result.resumed:
        print(f"resumed after batch {result.resumed} from {args.out / 'ledger.safetensors'}")
    if result.breach:
        b = result.breach
        crossed = "; ".join(f"{c['reading']} {c['value']:.4g} (limit {c['limit']:g})" for c in b["crossed"])
        kept = {1: "no batch", 2: f"batch 1 ({result.health[-1].n_edits} edits)"}.get(
            b["batch"], f"batches 1–{b['batch'] - 1} ({result.health[-1].n_edits} edits)")
        print(f"guard: batch {b['batch']} (cases {b['cases'][0]}–{b['cases'][-1]}) crossed {crossed}; it was reverted "
              f"(records {', '.join(b['records'])}); the ledger in {args.out} keeps {kept}")
        return GUARD_STOPPED
    print(f"{result.health[-1].n_edits} edits kept in {args.out / 'ledger.safetensors'}; health in {args.out / 'health.json'}")
    return 0
