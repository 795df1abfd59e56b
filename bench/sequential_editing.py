"""Sequential editing and one large batch: MEMIT beside AlphaEdit on the embedded model (issue 19).

    python bench/sequential_editing.py --edits 2000 --batch 100 --single 10000 --checkpoint out/bench_seq  # full run
    python bench/sequential_editing.py --edits 150 --batch 50 --single 100 --eval 50 --checkpoint out/bench_seq

Sequential: the first ``--edits`` cases of counterfact_edit_10k.json in batches of ``--batch``,
each batch on the model the earlier ones edited (:func:`tracer.evaluate.sequence.run_sequence`,
no guard thresholds), for every method of ``--methods``. Per batch: ES / PS / NS (× 100) of the
batch just written (before → after, up to ``--eval`` of its cases), of the first batch (still
there?), ‖W‖ / ‖W₀‖ of each edited matrix, perplexity on 16 held-out Wikipedia articles, the
n-gram entropy of text sampled from held-out openings, retention of a sample of earlier edits.
Single: the first ``--single`` cases in one batch with each method (scores on up to ``--eval``).
``--wide-layers 0-6`` adds every method of ``--methods`` over that wider range (capacity grows with
the edited layers; MEMIT's row there separates the effect of the range from that of the projection).
``--sweep`` first writes the first batch alone with AlphaEdit at each null-space threshold given
(``absolute:0.02,energy:0.02,...``) and with MEMIT, on the same z: how much the threshold costs.

z are kept under ``--checkpoint`` (shared: the first batch's z and a single batch's z are computed
once for all methods with the same last layer), every sequence's ledger and measured rows under
``--checkpoint/seq_<label>`` and the unedited scores (of a second, unedited copy of the model)
under ``--checkpoint/unedited.json``, so an interrupted run resumes with its rows. ``--minutes M``
starts no new batch of a sequence after M minutes of it: the same command run again continues each
sequence where it stopped; with ``--minutes 0`` it edits nothing more and writes the result from
the rows measured so far. The 10,000-edit batch needs its z (about 8 CPU-hours at 2.9 s each):
``python bench/memit_scale.py --sizes 10000 --checkpoint DIR --z-only`` does them ahead in
parallel shards into the same folder.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results import add_result_arguments, save_result  # noqa: E402
from tracer.commands.evaluate import parse_hparams, parse_layers  # noqa: E402
from tracer.edit import WeightBook, context_templates, load_records, load_statistics  # noqa: E402
from tracer.edit.alphaedit import compute_alphaedit  # noqa: E402
from tracer.edit.hparams import AlphaEditHyperParams, MemitHyperParams  # noqa: E402
from tracer.edit.memit import compute_memit  # noqa: E402
from tracer.edit.sequential import heldout_texts, perplexity  # noqa: E402
from tracer.evaluate import case_scores, load_cases, measure_probabilities, summarize  # noqa: E402
from tracer.evaluate.sequence import run_sequence  # noqa: E402
from tracer.files import write_json_atomic  # noqa: E402
from tracer.models import load_model  # noqa: E402


class OutOfTime(Exception):
    """``--minutes`` spent: stop a sequence after the batch just kept."""


class UneditedScores:
    """Scores of a batch's first ``n`` cases on the unedited model (a second copy, so a sequence can
    ask after editing), kept in ``path`` by case ids for reruns and the other methods."""

    def __init__(self, lm0, n: int, path: Path):
        self.lm0, self.n, self.path = lm0, n, path
        self.kept = json.loads(path.read_text()) if path.is_file() else {}

    def __call__(self, batch) -> dict:
        key = ",".join(str(c.case_id) for c in batch[:self.n])
        if key not in self.kept:
            self.kept[key] = scores(self.lm0, batch[:self.n])
            write_json_atomic(self.path, self.kept, indent=1)
        return self.kept[key]


def scores(lm, cases) -> dict:
    s = summarize([case_scores(measure_probabilities(lm, c)) for c in cases])
    return {k: round(s[k]["mean"], 1) for k in ("ES", "PS", "NS", "S") if k in s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=2000, help="sequential edits per method (0: skip)")
    ap.add_argument("--batch", type=int, default=100, help="edits per sequential batch")
    ap.add_argument("--single", type=int, default=10000, help="edits in the one-batch comparison (0: skip)")
    ap.add_argument("--eval", type=int, default=100, help="cases scored per batch (and of the single batch)")
    ap.add_argument("--methods", default="memit,alphaedit")
    ap.add_argument("--alpha", action="append", default=[], metavar="KEY=VALUE",
                    help="AlphaEdit setting (repeatable), e.g. nullspace_threshold=0.02 threshold_mode=energy")
    ap.add_argument("--wide-layers", default=None, help="also every method over these layers, e.g. 0-6")
    ap.add_argument("--sweep", default=None, help="thresholds MODE:VALUE,... for AlphaEdit on the first batch alone")
    ap.add_argument("--checkpoint", type=Path, required=True, help="z checkpoints and the sequences' ledgers")
    ap.add_argument("--minutes", type=float, default=None,
                    help="start no new batch of a sequence after this many minutes of it (rerun to continue)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    add_result_arguments(ap, "sequential_editing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model("smollm2-135m", device=args.device)
    cases = load_cases("counterfact-10k", limit=max(args.edits, args.single, args.batch))
    alpha = parse_hparams(args.alpha)
    configs = []  # (label, method, options)
    tag = "".join(f" {k}={v}" for k, v in sorted(alpha.items()))  # labels name the settings that differ
    for m in args.methods.split(","):
        configs.append((m + tag, m, dict(alpha)) if m == "alphaedit" else (m, m, {}))
    if args.wide_layers:
        layers = parse_layers(args.wide_layers)
        configs += [(f"{label} L{layers[0]}-{layers[-1]}", m, {**options, "layers": layers})
                    for label, m, options in configs]
    texts = heldout_texts()
    t = time.perf_counter()
    hp0 = MemitHyperParams.for_model(lm)
    statistics = load_statistics(lm, hp0, None)  # C of the default layers, read once (cached on disk)
    ppl0 = perplexity(lm, texts)
    norms0 = {lm.layers.mlp_out_name(l): float(lm.model.get_submodule(lm.layers.mlp_out_name(l)).weight.double().norm())
              for l in range(lm.n_layers)}
    print(f"threads {args.threads}; statistics and perplexity {time.perf_counter() - t:.0f} s; perplexity {ppl0:.3f}",
          flush=True)
    figures = {"model": lm.name, "dataset": "counterfact-10k", "edits": args.edits, "batch": args.batch,
               "eval": args.eval, "perplexity_unedited": round(ppl0, 3), "settings": {}, "sweep": [],
               "sequential": {}, "single": {}}

    def emit() -> None:
        save_result(args, args.result_name, figures, threads=args.threads)

    seq = cases[:args.edits]
    batches = [seq[s:s + args.batch] for s in range(0, len(seq), args.batch)]
    unedited = UneditedScores(load_model("smollm2-135m", device=args.device), args.eval, args.checkpoint / "unedited.json")
    first = cases[:args.batch]
    first_before = unedited(first)
    for item in (args.sweep.split(",") if args.sweep else []):
        mode, _, value = item.partition(":")
        t = time.perf_counter()
        if mode == "memit":
            rec = compute_memit(lm, first, hp0, statistics=statistics, checkpoint_dir=args.checkpoint / "z")
        else:
            hp = AlphaEditHyperParams.for_model(lm, **{**alpha, "threshold_mode": mode, "nullspace_threshold": float(value)})
            rec = compute_alphaedit(lm, first, hp, statistics=statistics, checkpoint_dir=args.checkpoint / "z")
        row = {"update": item, "seconds": round(time.perf_counter() - t, 1), "z_reused": rec.timings.get("z_reused"),
               "before": first_before, "after": scores(lm, first[:args.eval]), "perplexity": round(perplexity(lm, texts), 3),
               "norm_ratio": [round(float(lm.model.get_submodule(m).weight.double().norm()) / norms0[m], 4)
                              for m in rec.modules],
               **({"null_dim": [p["null_dim"] for p in rec.projection],
                   "null_energy": [round(p["null_energy"], 4) for p in rec.projection]} if hasattr(rec, "projection") else {})}
        rec.revert(lm)
        figures["sweep"].append(row)
        print(json.dumps(row), flush=True)
        emit()
    for label, method, options in configs:
        if not args.edits:
            break
        out = args.checkpoint / f"seq_{label.replace(' ', '_')}"
        kept_rows = out / "bench_rows.json"  # rows of the batches a resumed sequence does not redo
        rows = figures["sequential"][label] = (json.loads(kept_rows.read_text()) if kept_rows.is_file() else
                                               [{"edits": 0, "perplexity": round(ppl0, 3), "first_batch": first_before}])
        started = time.perf_counter()

        def on_batch(b, batch, records, health, rows=rows, started=started, kept_rows=kept_rows) -> None:
            row = {"edits": health.n_edits, "batch_s": round(health.seconds, 1),
                   "wall_s": round(time.perf_counter() - started, 1),
                   "norm_ratio": [round(v, 4) for v in health.norm_ratio.values()],
                   "perplexity": round(health.perplexity, 3), "entropy": round(health.entropy, 3),
                   "efficacy": health.efficacy, "retention": health.retention,
                   "z_reused": records[0].timings.get("z_reused"),
                   "this_batch": {"before": unedited(batch), "after": scores(lm, batch[:args.eval])},
                   "first_batch": scores(lm, batches[0][:args.eval])}
            del rows[b:]  # a batch the sequence redid after an interruption replaces its old row
            rows.extend({"batch": k, "not_measured": "interrupted between its ledger entry and this row"}
                        for k in range(len(rows), b))
            rows.append(row)
            write_json_atomic(kept_rows, rows, indent=1)
            print(json.dumps({"method": label, **row}), flush=True)
            emit()
            if args.minutes is not None and time.perf_counter() - started > 60 * args.minutes:
                raise OutOfTime

        if args.minutes == 0 and (out / "run.json").is_file():  # edit nothing more: the rows measured so far
            records = []
        else:
            try:
                result = run_sequence(lm, method, seq, batch_size=args.batch, out_dir=out, method_options=options,
                                      texts=texts, checkpoint_dir=args.checkpoint / "z", on_batch=on_batch)
                records = result.records
            except OutOfTime:  # the kept batches are in the ledger; the same command continues from them
                records = load_records(out / "ledger.safetensors")
                print(f"{label}: time budget spent after {rows[-1]['edits']} edits; stopping this sequence", flush=True)
        run = json.loads((out / "run.json").read_text())
        figures["settings"][label] = {k: v for k, v in run["settings"]["method_settings"].items() if k != "statistics"}
        figures["settings"][label]["entropy_unedited"] = json.loads((out / "health.json").read_text())["rows"][0]["entropy"]
        for rec in reversed(records):
            WeightBook.of(lm).revert(rec)
        emit()
    for label, method, options in configs:
        if not args.single:
            break
        batch = cases[:args.single]
        before = unedited(batch)
        t, cpu = time.perf_counter(), time.process_time()
        if method == "memit":
            hp = MemitHyperParams.for_model(lm, **options)
            rec = compute_memit(lm, batch, hp, statistics=statistics if hp.layers == hp0.layers else None,
                                checkpoint_dir=args.checkpoint / "z")
        else:
            hp = AlphaEditHyperParams.for_model(lm, **options)
            rec = compute_alphaedit(lm, batch, hp, statistics=statistics if hp.layers == hp0.layers else None,
                                    templates=context_templates(lm, hp), checkpoint_dir=args.checkpoint / "z")
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
        after = scores(lm, batch[:args.eval])
        ppl = perplexity(lm, texts)
        rec.revert(lm)
        figures["single"][label] = {"n": len(batch), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                                    "z_reused": rec.timings.get("z_reused"), "before": before, "after": after,
                                    "perplexity": round(ppl, 3), "layers": list(hp.layers),
                                    **({"projection": rec.projection} if hasattr(rec, "projection") else {})}
        print(json.dumps({"single": label, **figures["single"][label]}), flush=True)
        emit()


if __name__ == "__main__":
    main()
