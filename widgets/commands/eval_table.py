"""``--html`` of ``factscope eval-table`` on the UI's page template (:mod:`widgets.eval_page`).

The engine's command prints the Markdown table and can write a plain HTML table; :func:`register`
takes ``--html`` over: the path is checked before any work, the engine runs without it, then the
page (summary, chart, table, provenance) is written from the same runs.
"""
from __future__ import annotations

import argparse

from tracer.commands import check_output_path
from tracer.evaluate.harness import build_summary

from ..eval_page import write_eval_html


def register(subparsers) -> None:
    parser = subparsers.choices["eval-table"]
    parser.set_defaults(func=_with_page(parser.get_default("func")))


def _with_page(handler):
    def run(args: argparse.Namespace) -> int:
        path = check_output_path(args.html, "--html file")
        args.html = None  # the engine writes its Markdown only; the page is written here
        status = handler(args)
        if status == 0 and path is not None:
            summaries = [build_summary(d) for d in args.runs]
            dataset = summaries[0]["settings"]["dataset"]
            write_eval_html(summaries, path, title=args.title or f"factscope evaluation on {dataset}")
            print(f"table -> {path}")
        return status

    return run
