"""``factscope layer-sweep``: edit one fact at every layer and set the scores beside the trace's MLP effect.

    factscope layer-sweep --subject "The Eiffel Tower" --prompt "{} is located in the city of" \\
        --target " Rome" --true-target " Paris" --layers 0-12 \\
        --paraphrase "The Eiffel Tower, the famous landmark, stands in the city of" \\
        --neighbour "The Louvre is located in the city of" --json sweep.json

``--case N`` takes prompt, subject, targets, paraphrases and neighbours from CounterFact record N.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import FactscopeError, HyperParameterError
from ..evaluate.records import Case, load_cases
from ..files import write_json_atomic
from ..generation import greedy
from ..layer_sweep import layer_sweep
from ..limits import check_count, check_seed
from . import add_model_arguments, load_model_from_args, parse_layers


def register(subparsers) -> None:
    p = subparsers.add_parser("layer-sweep", help="edit one fact at each layer; scores beside the trace's MLP effect",
                              description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--subject", default=None, help="the subject, e.g. 'The Eiffel Tower'")
    p.add_argument("--prompt", default=None, help="prompt with {} for the subject (or containing the subject)")
    p.add_argument("--target", default=None, help="new answer, e.g. ' Rome'")
    p.add_argument("--true-target", default=None, help="the old answer (default: the model's greedy word after the prompt)")
    p.add_argument("--paraphrase", action="append", default=[], metavar="PROMPT", help="a paraphrase of the prompt (repeatable)")
    p.add_argument("--neighbour", action="append", default=[], metavar="PROMPT",
                   help="a prompt about another subject with the same true answer (repeatable)")
    p.add_argument("--case", type=int, default=None, metavar="N", help="take the fact from CounterFact record N instead")
    p.add_argument("--data", type=Path, default=None, help="CounterFact file for --case (default: the data folder's)")
    p.add_argument("--layers", required=True, help="layers to edit at, e.g. 0-12 or 2,4,6")
    p.add_argument("--samples", type=int, default=10, help="noise samples of the trace (default 10)")
    p.add_argument("--steps", type=int, default=None, help="ROME's v* optimisation steps (default: the model's default)")
    p.add_argument("--no-stats", action="store_true", help="use C = I instead of key statistics (labelled in the JSON)")
    p.add_argument("--seed", type=int, default=1, help="noise seed of the trace")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the sweep as JSON")
    p.set_defaults(func=run)


def _case(args, lm) -> Case:
    if args.case is not None:
        if args.case < 0:
            raise HyperParameterError(f"--case must be a record number >= 0, got {args.case}")
        cases = load_cases("counterfact", args.data, limit=args.case + 1)
        if len(cases) <= args.case:
            raise FactscopeError(f"the CounterFact file has only {len(cases)} records; --case {args.case} does not exist")
        return cases[args.case]
    true = args.true_target
    if true is None:  # the model's own answer: its greedy continuation's first word
        words = greedy(lm, [args.prompt.replace("{}", args.subject, 1)], 4)[0].split()
        if not words:
            raise FactscopeError("the model answers nothing after the prompt; pass --true-target")
        true = words[0].strip(".,;:!?")
    return Case(case_id=0, dataset="counterfact", subject=args.subject, prompt=args.prompt, target_new=args.target.strip(),
                target_true=true.strip(), paraphrase_prompts=tuple(args.paraphrase), neighborhood_prompts=tuple(args.neighbour),
                specificity_targets=(true.strip(),) * len(args.neighbour))


def run(args: argparse.Namespace) -> int:
    layers = parse_layers(args.layers)
    check_count("samples", args.samples)
    check_seed(args.seed)
    if args.case is None:
        missing = [f"--{n}" for n in ("subject", "prompt", "target") if getattr(args, n) is None]
        if missing:
            raise HyperParameterError(f"pass {', '.join(missing)} (or --case N for a CounterFact record)")
        if "{}" not in args.prompt and args.subject not in args.prompt:
            raise HyperParameterError(f"subject {args.subject!r} does not occur in prompt {args.prompt!r}; put {{}} where it goes")
        if "{}" not in args.prompt:
            args.prompt = args.prompt.replace(args.subject, "{}", 1)
    if args.json is not None and not args.json.expanduser().resolve().parent.is_dir():
        raise FactscopeError(f"--json {str(args.json)!r}: its directory does not exist")
    lm = load_model_from_args(args)
    case = _case(args, lm)
    overrides = {"v_num_grad_steps": args.steps} if args.steps is not None else {}
    sweep = layer_sweep(lm, case, layers, samples=args.samples, seed=args.seed,
                        stats="identity" if args.no_stats else None, **overrides)
    print(f"{case.rewrite_prompt!r}: {case.target_true!r} -> {case.target_new!r} ({lm.name}); scores × 100 after a ROME "
          f"edit at each layer, NKL in nats")
    print(sweep.markdown(), end="")
    if args.json is not None:
        write_json_atomic(args.json, sweep.to_dict(), indent=1)
        print(f"sweep -> {args.json}")
    return 0
