"""``factscope eval-table``: one table (Markdown, optional standalone HTML) from several evaluation runs."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import FactscopeError
from ..evaluate.harness import build_summary
from ..evaluate.report import summary_html, summary_markdown
from ..files import write_text_atomic


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval-table", help="combine `factscope evaluate` runs into one table (Markdown and HTML)",
        description="Read each DIR of `factscope evaluate` (finished or still running: the cases done so far) and "
                    "print one Markdown table: the unedited model (a `none` run, else the first run's pre-edit "
                    "measurements), then one row per run.")
    p.add_argument("runs", type=Path, nargs="+", help="output directories of `factscope evaluate`, same dataset")
    p.add_argument("--html", type=Path, default=None, help="also write the table as a standalone HTML page")
    p.add_argument("--title", default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    summaries = [build_summary(d) for d in args.runs]
    datasets = {s["settings"]["dataset"] for s in summaries}
    if len(datasets) > 1:
        raise FactscopeError(f"the runs evaluate different datasets ({', '.join(sorted(datasets))}); one table per dataset")
    empty = [str(d) for d, s in zip(args.runs, summaries) if not s["n_cases"]]
    if empty:
        raise FactscopeError(f"no finished cases yet in {', '.join(empty)}")
    print(summary_markdown(summaries), end="")
    if args.html is not None:
        dataset = datasets.pop()
        write_text_atomic(args.html, summary_html(summaries, title=args.title or f"factscope evaluation on {dataset}"))
        print(f"table -> {args.html}")
    return 0
