"""How MEMIT scales with the number of edits on the embedded model (and sequential ROME for contrast).

    OMP_NUM_THREADS=1 python bench/memit_scale.py --sizes 10,100,1000,10000 --eval 500
    python bench/memit_scale.py --sizes 10,100 --rome 20          # small run on a busy machine

For each size n: MEMIT on the first n cases of counterfact_edit_10k.json as one batch (wall time
split into statistics / z optimisation / keys+solve, peak resident memory of the process), then
efficacy, paraphrase and neighbourhood scores (the reduced file's metrics, × 100) before and
after on up to ``--eval`` of the edited cases, and perplexity on held-out Wikipedia text.
``--rome N`` applies ROME edits one after another (no revert) and reports the same scores on the
last ``--eval`` cases edited after 1, 2, 5, 10, ... edits (and every ``--rome-every`` edits), and
once more than ``--eval`` are edited the scores of the first ``--eval`` (``first``: are they still
there?), to show where sequential ROME breaks. ``--sequential N`` writes the first N cases as consecutive
MEMIT batches of ``--seq-batch`` (each on the model the earlier ones edited, C from the unedited
model) and after every batch prints the health read-out (Frobenius norm of each edited matrix over
the original, perplexity on held-out Wikipedia text) with the scores of the batch just written and
of the first batch (is it still there?). ``--sizes 0`` skips the one-batch runs.
Times are printed with their ratio to the smallest size;
``cpu_s`` (process CPU time) is the figure to trust on a shared machine.
Threads are fixed with ``--threads`` (default 1) and printed.

The 10,000-edit run is ~10 CPU-hours of z optimisation on the embedded model (measured: 3.51 CPU-s per z
on one core over the 8,756 of its z whose chunks recorded it, since z chunks group requests by length;
≈ 5.2 before); it can be done ahead, in pieces and in parallel, into the checkpoint directory the
measured run then reads::

    python bench/memit_scale.py --sizes 10000 --checkpoint out/bench_z --z-only --shard 0/2 &
    python bench/memit_scale.py --sizes 10000 --checkpoint out/bench_z --z-only --shard 1/2
    python bench/memit_scale.py --sizes 10,100,1000,10000 --checkpoint out/bench_z --eval 500

(a measured run with reused z reports ``z_reused``, and its ``z_s`` covers only new work; the CPU
and wall seconds the reused z took when they were optimised, as their checkpoints recorded them, are
``z_reused_cpu_s`` / ``z_reused_wall_s``, with ``z_reused_untimed`` z from files that predate the record).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results import add_result_arguments, save_result  # noqa: E402
from tracer.files import write_json_atomic  # noqa: E402
from tracer.edit import Ledger  # noqa: E402
from tracer.errors import FactscopeError  # noqa: E402
from tracer.edit import (MemitHyperParams, compute_memit, context_templates, load_statistics,  # noqa: E402
                         sequential_memit)
from tracer.edit.sequential import heldout_texts, perplexity  # noqa: E402
from tracer.edit.zs import compute_zs  # noqa: E402
from tracer.evaluate import case_scores, load_cases, measure_probabilities, summarize  # noqa: E402
from tracer.models import load_model  # noqa: E402


def parse_shard(value: str | None) -> tuple[int, int] | None:
    """``"K/N"`` -> ``(K, N)``: this process optimises the z of cases K, K+N, K+2N, ... (the bench's
    own split of the z work ahead; factscope's commands spread work with --ray, tracer.spread)."""
    if value is None:
        return None
    try:
        k, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like K/N (e.g. 0/2), got {value!r}") from None
    if not (n >= 1 and 0 <= k < n):
        raise ValueError(f"--shard K/N needs N >= 1 and 0 <= K < N, got {value!r}")
    return k, n


def scores(lm, cases):
    rows = [case_scores(measure_probabilities(lm, c)) for c in cases]
    s = summarize(rows)
    return {k: round(s[k]["mean"], 1) for k in ("ES", "PS", "NS", "S") if k in s}


def gpu_peak(lm) -> dict:
    if lm.device.type != "cuda":
        return {}
    return {"peak_gpu_mb": round(torch.cuda.max_memory_allocated(lm.device) / 2**20)}


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,100,1000,10000")
    ap.add_argument("--eval", type=int, default=200, help="edited cases measured per size")
    ap.add_argument("--rome", type=int, default=0, help="sequential ROME edits (0: skip)")
    ap.add_argument("--sequential", type=int, default=0, help="sequential MEMIT: this many edits (0: skip)")
    ap.add_argument("--seq-batch", type=int, default=100, help="edits per batch with --sequential")
    ap.add_argument("--rome-every", type=int, default=0,
                    help="with --rome: also report after every this many edits (0: only after 1, 2, 5, 10, 20, 50, ...)")
    ap.add_argument("--rome-ledger", type=Path, default=None,
                    help="with --rome: save the ledger here after every edit and, if the file exists, resume from "
                         "its edits (sequential ROME spread over several sittings)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda; on cuda peak GPU memory is reported too")
    ap.add_argument("--memory-mb", type=int, default=None,
                    help="activation budget of one z chunk (MemitHyperParams.memory_mb; default 2048): more on a GPU")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="keep each z chunk here so an interrupted run resumes (times then count only new work)")
    ap.add_argument("--z-only", action="store_true",
                    help="only optimise (and checkpoint) z for the first max(--sizes) cases, then stop")
    ap.add_argument("--shard", default=None, help="with --z-only: K/N, this process takes cases K, K+N, K+2N, ...")
    add_result_arguments(ap, None)  # writes memit_scale, memit_sequential and rome_sequential (NAME_ prefixed with --result-name)
    args = ap.parse_args()
    if args.z_only and args.checkpoint is None:
        ap.error("--z-only needs --checkpoint (that is where the z go)")
    if args.shard is not None and not args.z_only:
        ap.error("--shard splits the z work only; add --z-only")
    if args.rome_ledger is not None and not args.rome:
        ap.error("--rome-ledger needs --rome N (the number of sequential ROME edits to reach)")
    if args.rome_ledger is not None and not args.rome_ledger.parent.is_dir():
        ap.error(f"--rome-ledger {str(args.rome_ledger)!r}: directory {str(args.rome_ledger.parent)!r} does not exist")
    try:  # the edits an earlier run saved, read before the model loads so a bad file fails at once
        done = Ledger.load(args.rome_ledger) if args.rome_ledger is not None and args.rome_ledger.exists() else []
    except FactscopeError as e:
        ap.error(f"--rome-ledger: {e}")
    try:
        shard = parse_shard(args.shard) or (0, 1)
    except ValueError as e:
        ap.error(str(e))
    torch.set_num_threads(args.threads)
    try:
        sizes = [n for n in (int(s) for s in args.sizes.split(",")) if n > 0]
    except ValueError:
        ap.error(f"--sizes takes comma-separated edit counts such as 10,100,1000 (0 for none), got {args.sizes!r}")
    if min([args.rome, args.rome_every, args.sequential, args.eval]) < 0 or args.seq_batch < 1:
        ap.error("--rome, --rome-every, --sequential and --eval must be >= 0 and --seq-batch >= 1")
    if args.z_only and not sizes:
        ap.error("--z-only needs a size in --sizes (the z of its first max(--sizes) cases are computed)")
    lm = load_model("smollm2-135m", device=args.device)
    cases = load_cases("counterfact-10k", limit=max(sizes + [args.rome, args.sequential, 1]))
    hp = MemitHyperParams.for_model(lm, **({"memory_mb": args.memory_mb} if args.memory_mb else {}))
    templates = context_templates(lm, hp)
    if args.z_only:
        part = cases[:max(sizes)][shard[0]::shard[1]]
        t, cpu = time.perf_counter(), time.process_time()
        z = compute_zs(lm, part, hp, templates, checkpoint_dir=args.checkpoint)
        new = len(part) - z.reused
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
        print(json.dumps({"z_only": len(part), "shard": f"{shard[0]}/{shard[1]}", "reused": z.reused, "new": new,
                          "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                          "cpu_s_per_new_z": round(cpu / new, 2) if new else None}), flush=True)
        return
    texts = heldout_texts()
    t = time.perf_counter()
    statistics = load_statistics(lm, hp, None)
    print(f"threads {args.threads}; layers {list(hp.layers)}; lambda {hp.mom2_weight}; statistics {time.perf_counter() - t:.1f} s")
    results = []
    ppl0 = round(perplexity(lm, texts), 3)  # every section starts from (and reverts to) the unedited model
    sections = {"memit_scale": [], "memit_sequential": [], "rome_sequential": []}  # rows as docs/editing.md shows them

    def emit(row: dict, section: str, doc_row: dict) -> None:
        """Print a result row and keep ``--json`` and bench/results/ up to date (an interrupted run keeps its rows)."""
        results.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            write_json_atomic(args.json, results, indent=1)
        sections[section].append(doc_row)
        name = f"{args.result_name}_{section}" if args.result_name else section
        figures = {"model": lm.name, "dataset": "counterfact-10k", "eval": args.eval, "layers": list(hp.layers),
                   "lambda": hp.mom2_weight, "rows": sections[section]}
        if section == "memit_sequential":
            figures.update(batch=args.seq_batch)
        if section == "rome_sequential":
            figures.update(layer=rhp.layer)
        save_result(args, name, figures, threads=args.threads)
    for n in sizes:
        ev = cases[:min(n, args.eval)]
        before = scores(lm, ev)
        t, cpu = time.perf_counter(), time.process_time()
        rec = compute_memit(lm, cases[:n], hp, statistics=statistics, templates=templates, checkpoint_dir=args.checkpoint)
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
        after = scores(lm, ev)
        ppl = perplexity(lm, texts)
        rec.revert(lm)
        row = {"n": n, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "z_s": round(rec.timings["z_s"], 1), "update_s": round(rec.timings["update_s"], 1), "z_reused": rec.timings["z_reused"],
               **{k: round(rec.timings[k], 1) for k in ("z_reused_cpu_s", "z_reused_wall_s", "z_reused_untimed") if k in rec.timings},
               "s_per_edit": round(wall / n, 3), "peak_rss_mb": round(peak_mb()), **gpu_peak(lm), "before": before, "after": after,
               "perplexity": {"before": ppl0, "after": round(ppl, 3)}}
        emit(row, "memit_scale", row)
    if results:
        base = results[0]
        for r in results:
            print(f"n={r['n']:>6}: {r['wall_s']:>9.1f} s  x{r['wall_s'] / base['wall_s']:.1f} time for x{r['n'] / base['n']:.0f} edits")
    if args.sequential:
        seq = cases[:args.sequential]
        batches = [seq[s:s + args.seq_batch][:args.eval] for s in range(0, len(seq), args.seq_batch)]
        first = batches[0]
        unedited = [scores(lm, b) for b in batches]  # each batch's cases on the unedited model
        print(json.dumps({"memit_sequential": 0, "perplexity": ppl0, "first_batch": unedited[0]}), flush=True)
        sections["memit_sequential"].append({"edits": 0, "norm_ratio": None, "perplexity": ppl0, "this_batch": None,
                                             "first_batch": unedited[0]})

        def read_out(rec, health) -> None:
            just = seq[health.n_edits - len(rec.requests):health.n_edits][:args.eval]
            row = {"memit_sequential": health.n_edits, "batch": health.batch, "batch_s": round(health.seconds, 1),
                   "z_reused": rec.timings["z_reused"], "perplexity": round(health.perplexity, 3),
                   "norm_ratio": {m.split(".")[-3]: round(v, 4) for m, v in health.norm_ratio.items()},
                   "this_batch": {"before": unedited[health.batch - 1], "after": scores(lm, just)},
                   "first_batch": scores(lm, first), "peak_rss_mb": round(peak_mb())}
            norms = [v for _, v in sorted(row["norm_ratio"].items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else kv[0])]
            emit(row, "memit_sequential", {"edits": health.n_edits, "norm_ratio": norms, "perplexity": row["perplexity"],
                                           "this_batch": row["this_batch"], "first_batch": row["first_batch"],
                                           "batch_s": row["batch_s"], "peak_rss_mb": row["peak_rss_mb"]})

        records, _ = sequential_memit(lm, seq, args.seq_batch, hp, texts=texts, on_batch=read_out,
                                      checkpoint_dir=args.checkpoint)
        for rec in reversed(records):
            rec.revert(lm)
    if args.rome:
        from tracer.edit import ROMEHyperParams, rome_edit
        from tracer.edit import EditRequest, rome_templates
        from tracer.edit.statistics import statistics_at

        rhp = ROMEHyperParams.for_model(lm)
        stats = statistics_at(lm, rhp.layer, None, rhp.stats_tokens, chunk_tokens=rhp.stats_chunk_tokens)
        tmpl = rome_templates(lm, rhp)
        ledger = Ledger(lm)
        w_rome = lm.model.get_submodule(lm.layers.mlp_out_name(rhp.layer)).weight
        norm0 = float(w_rome.double().norm())
        checkpoints = {1, 2, 5, 10, 20, 50, 100, 200, 500, 1000}
        every = set(range(args.rome_every, args.rome + 1, args.rome_every)) if args.rome_every else set()
        marks = sorted(i for i in checkpoints | every | {args.rome} if i <= args.rome)

        def edited_so_far(i: int) -> dict:
            return scores(lm, cases[:i][-args.eval:]) if args.eval else {}

        unedited = {i: edited_so_far(i) for i in marks if i > len(done)}
        print(json.dumps({"rome_sequential": 0, "perplexity": ppl0}), flush=True)
        if done:  # the same requests, in order, computed on this model by an earlier run
            expected = [(c.subject, c.target_new.strip()) for c in cases[:len(done)]]
            if [(r.request.subject, r.request.target_new.strip()) for r in done] != expected:
                sys.exit(f"{args.rome_ledger} holds other edits than the first {len(done)} cases; use a new --rome-ledger")
            ledger.apply_all(done, verify=False)
            print(json.dumps({"rome_sequential": len(done), "resumed_from": str(args.rome_ledger),
                              "perplexity": round(perplexity(lm, texts), 3)}), flush=True)
        t = time.perf_counter()
        for i, c in enumerate(cases[:args.rome], start=1):
            if i <= len(done):
                continue
            req = EditRequest(c.prompt, c.subject, " " + c.target_new)
            ledger.apply(rome_edit(lm, req, rhp, stats, context_templates=tmpl, progress=False), verify=False)
            if args.rome_ledger is not None:
                ledger.save(args.rome_ledger)
            if i in unedited:
                row = {"rome_sequential": i, "wall_s": round(time.perf_counter() - t, 1), "edits_this_run": i - len(done),
                       "perplexity": round(perplexity(lm, texts), 3),
                       "norm_ratio": round(float(w_rome.double().norm()) / norm0, 4),
                       "before": unedited[i], "after": edited_so_far(i)}
                if args.eval and i > args.eval:  # are the first edits still there?
                    row["first"] = scores(lm, cases[:args.eval])
                emit(row, "rome_sequential", {"edits": i, "norm_ratio": row["norm_ratio"], "perplexity": row["perplexity"],
                                              "before": row["before"], "after": row["after"], "first": row.get("first"),
                                              "wall_s": row["wall_s"], "resumed_from": len(done) or None})
        ledger.revert_all()


if __name__ == "__main__":
    main()
