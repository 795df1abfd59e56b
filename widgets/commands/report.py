"""``factscope report``: trace a fact, edit it with ROME, trace again, check, write one HTML file.

    factscope report --model smollm2-135m --prompt "The Eiffel Tower is located in the city of" \\
        --subject "The Eiffel Tower" --target " Rome" --out report.html

Steps: causal traces of all three kinds -> ROME edit -> checks (rewrite prompt, paraphrases,
neighbours, generations) -> traces and layer-by-layer view of the edited model -> a standalone
HTML report (all JavaScript inlined; opens offline). The model's weights are restored at the end.
The command is part of the UI layer: :mod:`widgets.cli` registers it with the engine's CLI.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from tracer.commands import add_model_arguments, load_model_from_args
from tracer.edit import EditRequest, Ledger, ROMEHyperParams, check_edit, rome_edit
from tracer.errors import HyperParameterError
from tracer.lens import logit_lens
from tracer.limits import check_count
from tracer.trace import trace_all

from ..report import save_report

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "The Eiffel Tower is located in the city of"
DEFAULT_SUBJECT = "The Eiffel Tower"
DEFAULT_TARGET = " Rome"
#: checks used with the default fact when none are given
DEFAULT_PARAPHRASES = ("The Eiffel Tower, the famous landmark, stands in",)
DEFAULT_NEIGHBOURS = ("The Louvre is located in the city of", "The Arc de Triomphe is located in the city of")


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="trace, edit, re-trace and check one fact; write an offline HTML report",
                              description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt that contains the subject")
    p.add_argument("--subject", default=DEFAULT_SUBJECT, help="the subject, as written in the prompt")
    p.add_argument("--target", default=DEFAULT_TARGET, help="new answer of the edit, with its leading space (default ' Rome')")
    p.add_argument("--true-target", default=None, help="old answer (default: the model's top-1 before the edit)")
    p.add_argument("--paraphrase", action="append", default=None, metavar="PROMPT",
                   help="prompt that should change with the edit (repeatable)")
    p.add_argument("--neighbour", action="append", default=None, metavar="PROMPT",
                   help="prompt about another subject that should not change (repeatable)")
    p.add_argument("--samples", type=int, default=10, help="noise samples per trace (default 10)")
    p.add_argument("--noise", default="3s", help="noise scale: a number or a multiple of the embedding std like 3s")
    p.add_argument("--layer", type=int, default=None, help="edit layer (default: the family's ROME default)")
    p.add_argument("--stats-tokens", type=int, default=None,
                   help="tokens of Wikipedia text for the key statistics (default: ROME hyper-parameter default; cached)")
    p.add_argument("--no-edited-trace", action="store_true", help="skip the traces of the edited model")
    p.add_argument("--out", default="report.html", help="HTML file to write (default report.html)")
    add_model_arguments(p)
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    check_count("--samples", args.samples)
    out = Path(args.out)
    if out.is_dir():
        raise HyperParameterError(f"--out {str(out)!r} is a directory; pass a file name such as report.html")
    default_fact = (args.prompt, args.subject) == (DEFAULT_PROMPT, DEFAULT_SUBJECT)
    paraphrases = args.paraphrase if args.paraphrase is not None else (list(DEFAULT_PARAPHRASES) if default_fact else [])
    neighbours = args.neighbour if args.neighbour is not None else (list(DEFAULT_NEIGHBOURS) if default_fact else [])
    request = EditRequest(args.prompt, args.subject, args.target, args.true_target)  # validates before loading
    started = time.perf_counter()
    seconds = {}

    lm = load_model_from_args(args)
    overrides = {k: v for k, v in (("layer", args.layer), ("stats_tokens", args.stats_tokens)) if v is not None}
    hparams = ROMEHyperParams.for_model(lm, **overrides)
    _say(f"model {lm.name}: {lm.n_layers} layers; tracing {args.prompt!r} (subject {args.subject!r}) ...")
    t = time.perf_counter()
    traces = trace_all(lm, args.prompt, args.subject, samples=args.samples, noise=args.noise, progress=True)
    seconds["trace"] = time.perf_counter() - t
    hidden = traces["hidden"]
    _say(f"answer {hidden.answer!r}: p = {hidden.high_score:.3f} clean, {hidden.low_score:.3f} corrupted")

    t = time.perf_counter()
    _say(f"editing with ROME at layer {hparams.layer}: {args.subject!r} -> {args.target!r} ...")
    record = rome_edit(lm, request, hparams)
    seconds["edit"] = time.perf_counter() - t
    true = record.target_true
    targets = [args.target, true]
    lens = [logit_lens(lm, request.text, targets=targets, answer=False, label="before the edit")]
    t = time.perf_counter()
    check = check_edit(lm, record, paraphrases=paraphrases, neighbours=neighbours)
    seconds["checks"] = time.perf_counter() - t
    edited_traces = {}
    with Ledger(lm) as ledger:  # reverted on exit, also on errors
        ledger.apply(record)
        lens.append(logit_lens(lm, request.text, targets=targets, answer=False, label="after the edit"))
        if not args.no_edited_trace:
            t = time.perf_counter()
            _say("tracing the edited model ...")
            edited_traces = trace_all(lm, args.prompt, args.subject, samples=args.samples, noise=args.noise, progress=True)
            seconds["edited_trace"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - started

    checks = check.to_dict()
    settings = {
        "prompt": args.prompt, "subject": args.subject, "new target": args.target, "true target": true,
        "trace samples": args.samples, "noise": f"{hidden.noise.scale:.4g}" + (f" ({args.noise})" if hidden.noise.multiple is not None else ""),
        "noise mode": hidden.noise.mode, "window": traces["mlp"].window, "edit layer": record.layer,
        "edit module": record.module, "key statistics": _statistics_label(record.statistics),
        "efficacy": checks["efficacy"], "paraphrase score": checks["paraphrase_score"],
        "neighbourhood score": checks["neighbourhood_score"], "edit record id": record.id,
        **{f"seconds ({k})": f"{v:.1f}" for k, v in seconds.items()},
    }
    path = save_report(out, model=lm.name, traces=traces, edited_traces=edited_traces, edit_checks=checks["prompts"],
                       generations=checks["generations"], new_target=args.target, true_target=true, lens=lens,
                       settings=settings, title=f"factscope: {args.subject} \u2192 {args.target.strip()}")
    print(check.format())
    print(f"report written to {path.resolve()}  ({seconds['total']:.0f} s; open it in a browser, works offline)")
    return 0


def _statistics_label(stats: dict) -> str:
    """``second_moment over 100000 tokens of enwiki_....jsonl.gz`` from an edit record's statistics."""
    if "n_tokens" not in stats or stats.get("kind") == "identity":
        return "identity (C = I, no key statistics)" if stats.get("kind") == "identity" else \
            str(stats.get("label") or stats.get("kind") or stats)
    corpus = str(stats.get("corpus", "")).split(":")[0]
    return f"{stats.get('kind', 'C')} over {stats['n_tokens']} tokens of {Path(corpus).name or 'text'}"


def _say(text: str) -> None:
    print(text, flush=True)
