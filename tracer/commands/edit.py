"""``factscope edit``: rewrite one fact with ROME and show before/after predictions.

    factscope edit --model smollm2-135m --subject "The Eiffel Tower" \\
        --prompt "{} is located in the city of" --target " Rome" \\
        --check "The Louvre is located in the city of" --json edit.json --save-ledger eiffel.safetensors

The model's files are never written; ``--save-model DIR`` writes a new checkpoint with
``save_pretrained`` into a new (or empty) directory.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from . import add_model_arguments, load_model_from_args
from .plan import refuse_too_large, skeleton_from_args
from ..edit.check import check_edit, check_prompts
from ..edit.hparams import ROMEHyperParams
from ..edit.ledger import Ledger
from ..edit.record_files import save_records
from ..edit.requests import EditRequest
from ..edit.rome import rome_edit
from ..errors import EditError, HyperParameterError
from ..files import write_json_atomic
from ..limits import check_count, prompt_ids
from ..models import cache_dir
from ..stats import StatsCache

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser("edit", help="rewrite a fact with ROME (rank-one model editing)",
                              description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--subject", required=True, help="the subject, e.g. 'The Eiffel Tower'")
    p.add_argument("--prompt", required=True, help="prompt with {} for the subject (or containing the subject)")
    p.add_argument("--target", required=True, help="new answer, with its leading space, e.g. ' Rome'")
    p.add_argument("--true-target", default=None, help="the old answer (default: the model's top-1 before the edit)")
    p.add_argument("--check", action="append", default=[], metavar="PROMPT", help="another prompt to show before/after (repeatable)")
    p.add_argument("--layer", type=int, default=None, help="edit layer (default: the model's default)")
    p.add_argument("--steps", type=int, default=None, help="v* optimisation steps (default 20)")
    p.add_argument("--update", choices=("corrected", "original"), default=None,
                   help="update form: same k* everywhere (corrected, default) or the paper's original")
    p.add_argument("--stats-tokens", type=int, default=None, help="tokens of key statistics C (default: the model's default)")
    p.add_argument("--no-stats", action="store_true", help="use C = I instead of key statistics (labelled in the record)")
    p.add_argument("--stats-dir", default=None, help="key statistics cache directory (default: $FACTSCOPE_CACHE/stats)")
    p.add_argument("--save-ledger", default=None, metavar="PATH", help="write the edit as a ledger file (.safetensors)")
    p.add_argument("--save-model", default=None, metavar="DIR", help="write the edited model to a new directory")
    p.add_argument("--json", default=None, metavar="PATH", help="write the record and the checks as JSON")
    p.set_defaults(func=run)


def _check_outputs(args) -> None:
    """Reject unusable output paths before any work (and before the model is touched)."""
    for name in ("save_ledger", "json"):
        value = getattr(args, name)
        if value is not None and not Path(value).expanduser().resolve().parent.is_dir():
            raise EditError(f"--{name.replace('_', '-')} {value!r}: its directory does not exist")
    if args.save_model is not None:
        target = Path(args.save_model).expanduser()
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise EditError(f"--save-model {args.save_model!r} exists and is not an empty directory; pick a new directory "
                            "(the source model's files are never overwritten)")
    if args.steps is not None:
        check_count("--steps", args.steps)
    if args.stats_tokens is not None and args.stats_tokens < 0:
        raise HyperParameterError(f"--stats-tokens must be >= 0, got {args.stats_tokens}")


def settings(args, lm):
    """Hyper-parameters and statistics source the command uses (defaults from the model)."""

    overrides = {}
    if args.layer is not None:
        if not 0 <= args.layer < lm.n_layers:
            raise HyperParameterError(f"--layer {args.layer} does not exist: {lm.name} has layers 0..{lm.n_layers - 1}")
        overrides["layer"] = args.layer
    if args.steps is not None:
        overrides["v_num_grad_steps"] = args.steps
    if args.update is not None:
        overrides["update"] = args.update
    if args.stats_tokens is not None:
        overrides["stats_tokens"] = args.stats_tokens
    hp = ROMEHyperParams.for_model(lm, **overrides)
    stats = "identity" if args.no_stats else StatsCache(args.stats_dir or cache_dir() / "stats")
    return hp, stats


def _check_prompts(lm, request, hp, checks) -> None:
    """Every prompt the command will run fits the model, checked before the edit is computed:
    the rewrite prompt after the longest context template with the new target's tokens appended
    (the rows of v*), the --check prompts and the default generation prompts (as check_edit runs them)."""

    target = list(lm.tokenizer(request.target_new, add_special_tokens=False)["input_ids"])
    template = max((n for n, count in hp.context_template_lengths if count), default=0)
    prompt_ids(lm, request.text, "the --prompt", reserve=template + len(target),
               reserved_for=f"a {template}-token context template and the target's tokens")
    check_prompts(lm, [request.text, *checks], request.target_new, request.target_true,
                  [f"{request.subject} is", f"{request.subject} is famous for"],
                  labels=["the --prompt"] + [f"--check prompt {i + 1}" for i in range(len(checks))])


def run(args) -> int:

    _check_outputs(args)
    request = EditRequest(args.prompt, args.subject, args.target, args.true_target)
    skeleton = skeleton_from_args(args)  # settings, prompts and memory checked before the weights load
    hp, stats = settings(args, skeleton)
    _check_prompts(skeleton, request, hp, args.check)
    refuse_too_large(args, "edit", skeleton, prompt=request.prompt, subject=request.subject, target=request.target_new,
                     layer=hp.layer, steps=hp.v_num_grad_steps, stats_tokens=0 if args.no_stats else hp.stats_tokens)
    del skeleton  # its tokenizer and module tree: memory the edit can use
    lm = load_model_from_args(args)
    _check_prompts(lm, request, hp, args.check)  # the memory of one check batch, on the model's device
    record = rome_edit(lm, request, hp, stats, progress=bool(getattr(args, "verbose", False)))
    report = check_edit(lm, record, prompts=args.check)
    checks = [{"prompt": p.prompt, "kind": p.kind,
               "before": {"top1": p.before.top1, "p_new": p.before.p_new, "p_true": p.before.p_true},
               "after": {"top1": p.after.top1, "p_new": p.after.p_new, "p_true": p.after.p_true}} for p in report.prompts]
    print(f"edit {record.id}: {request.text!r} -> {request.target_new!r} (was {record.target_true!r}); layer {record.layer}, "
          f"{record.statistics['kind'] if record.statistics['kind'] == 'identity' else str(record.statistics['n_tokens']) + '-token C'}, "
          f"{record.seconds['total']:.1f} s")
    print(f"{'':<46} {'before':<30} after")
    for c in checks:
        cells = [f"{c[w]['top1']!r} p_new={c[w]['p_new']:.3f} p_true={c[w]['p_true']:.3f}" for w in ("before", "after")]
        prompt = c["prompt"] if len(c["prompt"]) <= 45 else c["prompt"][:42] + "..."
        print(f"{prompt:<46} {cells[0]:<30} {cells[1]}")
    for g in report.generations:
        print(f"generate {g.prompt!r}\n  before: {g.before!r}\n  after:  {g.after!r}")
    if args.json:
        doc = {**record.to_dict(), "checks": checks, "generations": [g.__dict__ for g in report.generations]}
        write_json_atomic(args.json, doc, indent=1)
    if args.save_ledger:
        save_records([record], args.save_ledger)
    if args.save_model:
        with Ledger(lm) as ledger:
            ledger.apply(record)
            ledger.export(args.save_model)
    return 0
