"""The CounterFact table with both kinds of metric: teacher-forced (the papers') and generated / CounterFact+.

    for m in none ft-l rome memit alphaedit; do
        factscope evaluate --method $m --dataset counterfact --limit 50 --generation-prompts 1 --out out/eval-gen/$m
    done
    python bench/counterfact_generation.py out/eval-gen/none out/eval-gen/ft-l out/eval-gen/rome out/eval-gen/memit
    python bench/counterfact_generation.py --add out/eval-gen/alphaedit     # one more row, same cases

``--add`` keeps the stored result's rows and appends the new runs' rows over the same case ids
(each added run must have finished all of them), so a method can join the table without
re-running the others; the commands recorded are the stored ones followed by ``--command``.

Reads each ``factscope evaluate`` directory (the cases every run has finished) and writes
``bench/results/counterfact_generation.json``: per method the papers' ES / PS / NS / EM / PM / NM /
GE / RS and S, beside ES-g / PS-g (greedy continuations) and NS+ / NM+ / NKL (CounterFact+), with
the first run's settings. The command recorded is the evaluate commands, given with ``--command``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results import add_result_arguments, load_result, machine, save_result  # noqa: E402
from tracer.evaluate.harness import build_summary  # noqa: E402

COLUMNS = ("ES", "PS", "NS", "EM", "PM", "NM", "GE", "RS", "ES-g", "PS-g", "NS+", "NM+", "NKL")


def row(summary: dict, phase: str, label: str) -> dict:
    s = summary[phase]
    out = {"method": label, "n": summary["n_cases"], "S": round(s["S"]["mean"], 1) if "S" in s else None}
    for c in COLUMNS:
        if c in s:
            digits = 4 if c == "NKL" else 1
            out[c] = {"mean": round(s[c]["mean"], digits), "std": round(s[c]["std"], digits)}
    sec = summary.get("seconds_per_edit")
    out["s_per_edit"] = round(sec, 2) if sec is not None and phase == "post" and label != "unedited" else None
    bs = summary["settings"].get("batch_size")
    if summary["settings"]["method"] in ("memit", "alphaedit") and label != "unedited":
        out["batch"] = bs
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+", help="factscope evaluate directories (a none run first)")
    ap.add_argument("--add", action="store_true", help="append these runs' rows to the stored result (same cases)")
    ap.add_argument("--command", default=None, help="the commands that produced the runs (recorded in the result)")
    ap.add_argument("--note", default=None, help="machine note recorded with the result")
    add_result_arguments(ap, "counterfact_generation")
    args = ap.parse_args()
    done = [{int(f.stem) for f in (d / "cases").glob("*.json")} for d in args.runs]
    if args.add:
        add_rows(args, done)
        return
    common = sorted(set.intersection(*done))  # every row over the same cases
    summaries = [build_summary(d, cases=[SimpleNamespace(case_id=i) for i in common]) for d in args.runs]
    rows = []
    for s in summaries:
        method = s["settings"]["method"]
        rows.append(row(s, "post", "unedited") if method == "none" else row(s, "post", method))
    if all(s["settings"]["method"] != "none" for s in summaries):
        rows.insert(0, row(summaries[0], "pre", "unedited"))
    first = summaries[0]["settings"]
    figures = {"model": first["model"], "dataset": first["dataset"], "scale": "×100, mean ± std over cases; NKL in nats",
               "greedy_tokens": first.get("greedy_tokens"), "generation_prompts": first.get("generation_prompts"),
               "case_ids": common, "rows": rows}
    settings = {s["settings"]["method"]: s["settings"]["method_settings"] for s in summaries}
    extra = {"settings": settings}
    if args.note:
        extra["machine"] = {**machine(), "note": args.note}
    run_summary = args.runs[-1] / "summary.json"  # the torch threads of the evaluation, not of this process
    threads = json.loads(run_summary.read_text()).get("torch_threads") if run_summary.is_file() else None
    save_result(args, args.result_name, figures, command=args.command, threads=threads, **extra)
    for r in rows:
        print(r)


def add_rows(args: argparse.Namespace, done: list[set[int]]) -> None:
    """Append the rows of ``args.runs`` to the stored result, over its case ids."""
    stored = load_result(args.result_name)
    figures = stored["figures"]
    common = figures["case_ids"]
    for d, ids in zip(args.runs, done):
        if missing := sorted(set(common) - ids):
            sys.exit(f"{d} has not finished cases {missing[:5]} of the stored table; run it with the same --limit")
    summaries = [build_summary(d, cases=[SimpleNamespace(case_id=i) for i in common]) for d in args.runs]
    if any(s["settings"]["model"] != figures["model"] or s["settings"]["dataset"] != figures["dataset"] for s in summaries):
        sys.exit(f"the runs must be of {figures['model']} on {figures['dataset']}, like the stored table")
    new = [row(s, "post", s["settings"]["method"]) for s in summaries]
    figures["rows"] = [r for r in figures["rows"] if r["method"] not in {n["method"] for n in new}] + new
    settings = {**stored.get("settings", {}), **{s["settings"]["method"]: s["settings"]["method_settings"] for s in summaries}}
    command = "; ".join(filter(None, [stored.get("command"), args.command,
                                      "python bench/counterfact_generation.py --add " + " ".join(map(str, args.runs))]))
    save_result(args, args.result_name, figures, command=command, threads=stored.get("threads"), settings=settings)
    for r in new:
        print(r)


if __name__ == "__main__":
    main()
