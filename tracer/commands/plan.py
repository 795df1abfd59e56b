"""``factscope plan``: what a job will need (memory per device, seconds) before anything loads.

    factscope plan --job trace --prompt "The Eiffel Tower is located in the city of" \\
        --subject "The Eiffel Tower" --samples 10 --json
    factscope plan --job memit --edits 1000 --dtype bfloat16 --device-map auto

Read from the model's config alone (the meta device, no weights); see :mod:`tracer.plan`.
:func:`refuse_too_large` is the same planner, asked by every heavy command before it loads the
model: a job that cannot fit is refused with one line giving the estimate and the limit.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import add_model_arguments, parse_layers
from ..errors import JobTooLargeError
from ..models import LanguageModel, model_skeleton
from ..plan import JOBS, Plan, check_plan, plan
from ..trace_result import KINDS


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="peak memory per device and time of a job, from the model's config alone",
                              description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", required=True, choices=JOBS)
    p.add_argument("--json", action="store_true", help='print {"peak_bytes", "per_device", "seconds", ...} as JSON')
    p.add_argument("--no-time", action="store_true", help="skip the throughput measurement (seconds: null)")
    g = p.add_argument_group("the job's sizes (each job reads its own)")
    g.add_argument("--prompt", help="trace: the prompt; edit: the prompt with {} for the subject")
    g.add_argument("--subject")
    g.add_argument("--target", help="edit: the new target, e.g. ' Rome'")
    g.add_argument("--samples", type=int, default=10, help="trace, trace-dataset: noise samples (default 10)")
    g.add_argument("--kind", default="hidden", choices=[*KINDS, "all"], help="trace, trace-dataset: what is restored")
    g.add_argument("--window", type=int, default=10)
    g.add_argument("--naive", action="store_true", help="trace: one forward pass per restoration")
    g.add_argument("--edits", type=int, default=None, help="memit, evaluate: requests (the first CounterFact records)")
    g.add_argument("--method", default="rome", choices=("none", "ft-l", "rome", "memit"), help="evaluate: the method")
    g.add_argument("--batch-size", type=int, default=None, help="evaluate: edits per MEMIT batch (default all)")
    g.add_argument("--no-generation", action="store_true", help="evaluate: without generations")
    g.add_argument("--layer", type=int, default=None, help="edit: the edit layer")
    g.add_argument("--layers", default=None, help="memit, stats: layers, e.g. 2-6 or 2,3,4")
    g.add_argument("--steps", type=int, default=None, help="edit: v* optimisation steps")
    g.add_argument("--stats-tokens", type=int, default=None, help="edit, stats: tokens of key statistics C")
    g.add_argument("--facts", type=Path, default=None, help="trace-dataset: the facts file (default: the known facts)")
    g.add_argument("--limit", type=int, default=None, help="trace-dataset: the first N facts")
    g.add_argument("--workers", type=int, default=1, help="trace-dataset, evaluate: Ray workers, each with its own model")
    add_model_arguments(p)
    p.set_defaults(func=run)


def _layers(text: str | None):
    return parse_layers(text) if text else None


def sizes(args: argparse.Namespace) -> dict:
    """The planner's keyword arguments for ``args.job`` from the command line."""
    kinds = KINDS if args.kind == "all" else (args.kind,)
    trace = {"samples": args.samples, "kinds": kinds, "window": args.window}
    if args.job == "trace":
        return {**trace, "prompt": args.prompt, "subject": args.subject, "naive": args.naive}
    if args.job == "edit":
        given = {"prompt": args.prompt, "subject": args.subject, "target": args.target}
        return {**{k: v for k, v in given.items() if v is not None}, "layer": args.layer, "steps": args.steps,
                "stats_tokens": args.stats_tokens}
    if args.job == "memit":
        return {"edits": args.edits or 1, "layers": _layers(args.layers)}
    if args.job == "evaluate":
        return {"method": args.method, "edits": args.edits or 1, "batch_size": args.batch_size,
                "generation": not args.no_generation, "workers": args.workers}
    if args.job == "stats":
        return {"layers": _layers(args.layers), "stats_tokens": args.stats_tokens or 100_000}
    return {**trace, "facts": args.facts, "limit": args.limit, "workers": args.workers}


def skeleton_from_args(args: argparse.Namespace) -> LanguageModel:
    """``--model`` on the meta device (:func:`tracer.models.model_skeleton`): settings and prompts
    can be checked against it before the weights load."""
    return model_skeleton(args.model, args.dtype)


def plan_from_args(args: argparse.Namespace, job: str, measure: bool = False, skeleton: LanguageModel | None = None,
                   **job_sizes) -> Plan:
    """:func:`tracer.plan.plan` with the model options of :func:`add_model_arguments`."""
    return plan(job, skeleton or args.model, dtype=args.dtype, device=args.device, device_map=args.device_map,
                max_memory=args.max_memory, measure=measure, **job_sizes)


def refuse_too_large(args: argparse.Namespace, job: str, skeleton: LanguageModel | None = None, **job_sizes) -> Plan:
    """Plan ``job`` from the model's config and refuse it (one line: estimate and limit) when a
    device cannot hold it; called by the heavy commands before the model loads."""
    p = plan_from_args(args, job, skeleton=skeleton, **job_sizes)
    check_plan(p)
    return p


def run(args: argparse.Namespace) -> int:
    p = plan_from_args(args, args.job, measure=not args.no_time, **sizes(args))
    try:
        check_plan(p)
        refusal = None
    except JobTooLargeError as e:
        refusal = str(e)
    if args.json:
        print(json.dumps({**p.to_dict(), "fits": refusal is None, "refusal": refusal}, indent=1))
    else:
        print(p.format())
        print(f"refused here: {refusal}" if refusal else "fits in the memory available now")
    return 0
