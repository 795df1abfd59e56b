"""``factscope report``: trace a fact, edit it with ROME, trace again, check, write one HTML file.

    factscope report --model smollm2-135m --prompt "The Eiffel Tower is located in the city of" \\
        --subject "The Eiffel Tower" --target " Rome" --out report.html

Steps: causal traces of all three kinds -> ROME edit -> checks (rewrite prompt, paraphrases,
neighbours, generations) -> traces and layer-by-layer view of the edited model -> a standalone
HTML report (all JavaScript inlined; opens offline). The model's weights are restored at the end.

From saved results, without loading a model or recomputing anything:

    factscope report --from-trace eiffel.json [--ledger eiffel.safetensors] [--edited-trace e.json]

``--from-trace``: the JSON of ``factscope trace --json`` (one kind or ``--kind all``);
``--ledger``: a ledger file (``factscope edit --save-ledger``): its ROME records give the edit's
before -> after on the edited prompt; ``--edited-trace``: a trace of the edited model, shown
beside the original with their difference.
The command is part of the UI layer: :mod:`widgets.cli` registers it with the engine's CLI.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from tracer.commands import add_model_arguments, load_model_from_args
from tracer.commands.plan import refuse_too_large, skeleton_from_args
from tracer.edit import EditRecord, EditRequest, Ledger, ROMEHyperParams, check_edit, rome_edit
from tracer.errors import FactscopeError, HyperParameterError
from tracer.lens import logit_lens
from tracer.limits import check_count
from tracer.trace import trace_all
from tracer.trace_result import KINDS, TraceResult

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
    p.add_argument("--from-trace", type=Path, default=None, metavar="JSON",
                   help="build the report from a saved trace (factscope trace --json) without loading a model")
    p.add_argument("--edited-trace", type=Path, default=None, metavar="JSON",
                   help="with --from-trace: a saved trace of the edited model, shown beside the original")
    p.add_argument("--ledger", type=Path, default=None, metavar="FILE",
                   help="with --from-trace: a ledger file (factscope edit --save-ledger); its edits' before/after")
    add_model_arguments(p)
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    check_count("--samples", args.samples)
    out = Path(args.out)
    if out.is_dir():
        raise HyperParameterError(f"--out {str(out)!r} is a directory; pass a file name such as report.html")
    if args.from_trace is not None:
        return saved_report(args, out)
    if args.ledger is not None or args.edited_trace is not None:
        raise HyperParameterError("--ledger and --edited-trace build a report from saved results; pass --from-trace too")
    default_fact = (args.prompt, args.subject) == (DEFAULT_PROMPT, DEFAULT_SUBJECT)
    paraphrases = args.paraphrase if args.paraphrase is not None else (list(DEFAULT_PARAPHRASES) if default_fact else [])
    neighbours = args.neighbour if args.neighbour is not None else (list(DEFAULT_NEIGHBOURS) if default_fact else [])
    request = EditRequest(args.prompt, args.subject, args.target, args.true_target)  # validates before loading
    started = time.perf_counter()
    seconds = {}

    skeleton = skeleton_from_args(args)  # the planner, from the config: both jobs must fit before anything loads
    refuse_too_large(args, "trace", skeleton, prompt=args.prompt, subject=args.subject, samples=args.samples, kinds=KINDS)
    refuse_too_large(args, "edit", skeleton, prompt=request.prompt, subject=request.subject, target=request.target_new,
                     layer=args.layer, stats_tokens=args.stats_tokens)
    del skeleton  # its tokenizer and module tree: memory the jobs can use
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


# ------------------------------------------------------------------------------- saved results
def load_traces(path: Path, what: str = "--from-trace") -> dict[str, TraceResult]:
    """The traces of a ``factscope trace --json`` file, by kind; a malformed file is one error line."""
    if not path.is_file():
        raise FactscopeError(f"{what} file {str(path)!r} does not exist")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        items = doc if isinstance(doc, list) else [doc]
        traces = [TraceResult.from_dict(d) for d in items]
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise FactscopeError(f"{what} {str(path)!r} is not the JSON of `factscope trace --json` "
                             f"({type(e).__name__}: {str(e)[:100]})") from None
    if not traces:
        raise FactscopeError(f"{what} {str(path)!r} holds no trace")
    return {t.kind if not t.severed else f"{t.kind}-severed-{t.severed}": t for t in traces}


def ledger_checks(records: list, subject: str) -> tuple[list[dict], dict]:
    """Rewrite checks (before -> after on each ROME record's prompt, as measured when the edit was
    made) of the records about ``subject`` (else of all), and the settings to show."""
    rome = [r for r in records if isinstance(r, EditRecord)]
    about = [r for r in rome if r.request.subject == subject] or rome
    checks = [{"prompt": r.request.text, "kind": "rewrite", "before": dict(r.before), "after": dict(r.after)}
              for r in about if r.before and r.after]
    settings = {"edits in the ledger": f"{len(records)} ({len(rome)} ROME, {len(records) - len(rome)} MEMIT)"}
    if about:
        r = about[0]
        settings.update({"edit record id": r.id, "edit layer": r.layer, "edit module": r.module,
                         "key statistics": _statistics_label(r.statistics), "new target": r.request.target_new,
                         "true target": r.target_true})
    return checks, settings


def saved_report(args: argparse.Namespace, out: Path) -> int:
    """``factscope report --from-trace``: the report from saved traces and a ledger; no model."""
    traces = load_traces(args.from_trace)
    edited = load_traces(args.edited_trace, "--edited-trace") if args.edited_trace is not None else {}
    records = Ledger.load(args.ledger) if args.ledger is not None else []
    first = next(iter(traces.values()))
    checks, edit_settings = ledger_checks(records, first.subject)
    new = edit_settings.get("new target", args.target if args.ledger is None else "new")
    true = edit_settings.get("true target", first.answer)
    settings = {"prompt": first.prompt, "subject": first.subject, "answer": first.answer,
                "trace samples": first.samples, "noise": f"{first.noise.scale:.4g}", "noise mode": first.noise.mode,
                "window": max(t.window for t in traces.values()), "trace file": str(args.from_trace)}
    if args.edited_trace is not None:
        settings["edited trace file"] = str(args.edited_trace)
    if args.ledger is not None:
        settings.update({"ledger file": str(args.ledger), **edit_settings})
    title = f"factscope: {first.subject}" + (f" \u2192 {new.strip()}" if checks else "")
    path = save_report(out, model=first.model, traces=traces, edited_traces=edited, edit_checks=checks,
                       new_target=new, true_target=true, settings=settings, title=title)
    print(f"report written to {path.resolve()} from saved results (open it in a browser, works offline)")
    return 0
