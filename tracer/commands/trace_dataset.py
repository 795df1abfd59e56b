"""``factscope trace-dataset``: resumable causal traces of every fact in a facts file, then averages."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..dataset_trace import check_settings, load_failures, trace_dataset
from ..errors import HyperParameterError
from ..knowns import load_facts
from ..limits import check_count
from . import add_model_arguments, add_ray_arguments, check_ray_arguments, model_runner
from .plan import refuse_too_large
from .averages import hook, report


def _kinds(text: str) -> tuple[str, ...]:
    text = text.strip()
    if text == "all":
        return ("hidden", "mlp", "attn")
    if text == "none":
        return ()
    return tuple(k.strip() for k in text.split(",") if k.strip())


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "trace-dataset", help="trace every fact of a facts file (resumable, --ray) and average the effects",
        description="Trace each fact into DIR/facts/<id>.json (finished facts are skipped on restart, failures "
                    "go to DIR/failed/), then write DIR/averages.json with bucketed average effects.")
    p.add_argument("--facts", type=Path, required=True, help="known_1000.json-format file or `factscope knowns` output")
    p.add_argument("--kind", default="all", help="all, none, or a comma list of hidden,mlp,attn (default all)")
    p.add_argument("--severed", default="", help="comma list of mlp,attn: add hidden traces with that path severed "
                                                 "(the paper's Figure 7)")
    p.add_argument("--severed-tokens", default="last_subject", choices=("last_subject", "all"),
                   help="token rows of the severed traces: the last subject token, as the paper's Figure 7 "
                        "(default), or every token from the subject on")
    p.add_argument("--limit", type=int, default=None, help="only the first N facts of the file")
    p.add_argument("--out", type=Path, required=True, help="output directory (resumed when it exists)")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--noise", default="3s", help="absolute scale (0.1) or multiple of the embedding std (3s)")
    p.add_argument("--noise-mode", default="rome", choices=("rome", "torch"))
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--retry-failed", action="store_true", help="trace facts recorded as failed again")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the averages' CIs (default 1000)")
    add_model_arguments(p)
    add_ray_arguments(p)
    p.set_defaults(func=run, on_averages=None)  # see tracer.commands.averages


def run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise HyperParameterError(f"--limit must be >= 1, got {args.limit}")
    check_count("--n-boot", args.n_boot)  # 0: no confidence intervals
    severed = tuple(s.strip() for s in args.severed.split(",") if s.strip())
    settings = dict(kinds=_kinds(args.kind), severed=severed, samples=args.samples, window=args.window,
                    seed=args.seed, limit=args.limit, retry_failed=args.retry_failed,
                    severed_tokens=args.severed_tokens)
    check_settings(**settings)  # all before the model loads and before --out is created
    check_ray_arguments(args)
    load_facts(args.facts)
    if settings["kinds"]:
        refuse_too_large(args, "trace-dataset", facts=args.facts, limit=args.limit, samples=args.samples,
                         kinds=settings["kinds"], window=args.window, workers=args.workers or 1 if args.ray else 1)
    with model_runner(args) as runner:
        summary = trace_dataset(runner, args.facts, args.out, noise=args.noise, noise_mode=args.noise_mode,
                                **settings)
    print(f"{summary.traced} traced, {summary.failed} failed, {summary.already_done} already done "
          f"of {summary.selected} facts in {summary.seconds:.0f} s -> {args.out}")
    for rec in load_failures(args.out)[:5]:
        print(f"  failed: {rec['fact']['known_id']}: {rec['error']}")
    status = report(args.out, n_boot=args.n_boot, on_averages=hook(args))
    return 1 if status and summary.failed else 0
