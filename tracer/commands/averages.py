"""``factscope averages``: bucketed average effects of the facts a dataset trace has finished so far.

The engine writes JSON and text. Other layers add outputs through ``on_averages``: a default
of this command's parser (and of ``trace-dataset``'s) holding ``None`` or a callable
``on_averages(args, averages)`` called with the averages once they are written — the way
:mod:`widgets.commands.averages` adds ``--html`` without the engine importing the UI.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Mapping

from ..aggregate import EffectAverages, aggregate_all, layer_table
from ..dataset_trace import load_traces
from ..errors import DatasetError
from ..files import write_json_atomic
from ..limits import COUNT_LIMITS, check_count

#: what ``on_averages`` receives: every kind's averages (``label -> EffectAverages``), as written to JSON
AveragesHook = Callable[[Mapping[str, EffectAverages]], None]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "averages", help="average effects over the finished facts of a trace-dataset directory",
        description="Read DIR/facts/*.json of a `factscope trace-dataset` run (finished or still running), average "
                    "the effects per token bucket and layer with bootstrap CIs, print a summary and write "
                    "DIR/averages.json (or --json).")
    p.add_argument("traces", type=Path, help="the --out directory of `factscope trace-dataset`")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs (default 1000)")
    p.add_argument("--json", type=Path, default=None, help="where to write the averages (default DIR/averages.json)")
    p.add_argument("--markdown", choices=("last_subject", "last", "first_subject", "middle_subject",
                                          "first_subsequent", "further"), default=None,
                   help="also print a markdown table of the average indirect effect per layer in this bucket")
    p.set_defaults(func=run, on_averages=None)


def report(out_dir: Path, *, n_boot: int, json_path: Path | None = None, markdown: str | None = None,
           on_averages: AveragesHook | None = None) -> int:
    """Aggregate, write JSON, print one line per kind, then call ``on_averages(averages)``;
    1 when nothing is finished yet (``on_averages`` is then not called)."""
    averages = aggregate_all(load_traces(out_dir), n_boot=n_boot)
    if not averages:
        print(f"no finished traces to average in {out_dir}")
        return 1
    write_json_atomic(json_path or out_dir / "averages.json", {k: v.to_dict() for k, v in averages.items()}, sort_keys=True)
    for label, avg in averages.items():
        print(f"{label:<20} {avg.n_facts} facts  ATE {avg.total_effect:.3f}  AIE peak at last subject token: "
              f"{avg.peak_text('last_subject')}; at last token: {avg.peak_text('last')}")
    if markdown:
        print(layer_table(averages, markdown))
    if on_averages is not None:
        on_averages(averages)
    return 0


def hook(args: argparse.Namespace) -> AveragesHook | None:
    """The parsed command's ``on_averages`` default bound to ``args``, or None when no layer set one."""
    fn = getattr(args, "on_averages", None)
    return None if fn is None else (lambda averages: fn(args, averages))


def run(args: argparse.Namespace) -> int:
    check_count("--n-boot", args.n_boot, (1, COUNT_LIMITS["n_boot"][1]))
    if not (args.traces / "facts").is_dir():
        raise DatasetError(f"{args.traces} is not a `factscope trace-dataset` directory (it has no facts/ folder)")
    return report(args.traces, n_boot=args.n_boot, json_path=args.json, markdown=args.markdown, on_averages=hook(args))
