"""``factscope health-page``: the health page of a sequential-editing run (:mod:`widgets.health_page`).

    factscope health-page out/seq --out health.html

Reads ``health.json`` (one read-out per batch, and the batch a guard stopped at) and ``run.json``
(the run's settings and guard) of a ``factscope sequential --out`` directory; writes one offline
HTML page: summary, norm growth, perplexity, edits that hold, table, provenance. No model is loaded.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tracer.commands import check_output_path
from tracer.files import write_text_atomic

from ..health_page import health_page_from_run


def register(subparsers) -> None:
    p = subparsers.add_parser("health-page", help="the health page (norm growth, perplexity, retention per batch) "
                                                  "of a sequential-editing run, as offline HTML",
                              description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("run", type=Path, help="the --out directory of a sequential run (health.json, run.json)")
    p.add_argument("--out", type=Path, required=True, help="HTML file to write")
    p.add_argument("--title", default=None, help="page title")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = check_output_path(args.out, "--out file")
    kw = {"title": args.title} if args.title else {}
    page = health_page_from_run(args.run, **kw)
    write_text_atomic(path, page.html())
    print(f"health page -> {path}")
    return 0
