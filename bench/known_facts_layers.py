"""Average causal traces of a model's known facts, by layer, from a `factscope trace-dataset` run.

    factscope knowns --model gemma3-270m --out out/knowns.json
    factscope trace-dataset --model gemma3-270m --facts out/knowns.json --kind hidden,mlp --limit 40 --out out/traces
    python bench/known_facts_layers.py out/traces --result-name known_facts_gemma3

For every traced kind: the average indirect effect per layer in one token bucket (the last subject
token by default), its peak layer with the 95 % bootstrap interval of the effect there, and the
peak's relative depth (layer / layers), the figure that compares models of other depths. Also
the layers whose effect lies inside the peak's interval (what the data cannot tell apart from
the peak), the average total effect, and the CPU seconds per fact the run logged.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from results import add_result_arguments, save_result  # noqa: E402  (bench/ is the script's folder)

from tracer.aggregate import aggregate_all
from tracer.dataset_trace import load_failures, load_traces, read_settings

LABELS = {"hidden": "hidden", "mlp": "MLP (window {w})", "attn": "attention (window {w})",
          "hidden-severed-mlp": "hidden, MLPs above severed", "hidden-severed-attn": "hidden, attention above severed"}


def _cpu_seconds(out_dir: Path) -> list[float]:
    log = out_dir / "log.jsonl"
    if not log.is_file():
        return []
    rows = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [float(r["cpu_seconds"]) for r in rows if isinstance(r, dict) and r.get("status") == "ok" and "cpu_seconds" in r]


def figures(out_dir: Path, bucket: str, n_boot: int) -> dict:
    settings = read_settings(out_dir)
    averages = aggregate_all(load_traces(out_dir), n_boot=n_boot)
    if not averages:
        raise SystemExit(f"no finished traces in {out_dir}")
    first = next(iter(averages.values()))
    n_layers = first.n_layers
    rows = []
    for label, a in averages.items():
        i = a.buckets.index(bucket)
        values, lo, hi = a.indirect[i], a.indirect_ci[0, i], a.indirect_ci[1, i]
        peak = int(np.nanargmax(values))
        rows.append({"label": LABELS.get(label, label).format(w=settings.window), "kind": label,
                     "values": [round(float(v), 4) for v in values], "peak": peak,
                     "peak_ci": [round(float(lo[peak]), 4), round(float(hi[peak]), 4)],
                     "inside_peak_ci": [int(layer) for layer in np.flatnonzero(values >= lo[peak])],
                     "relative_depth": round(peak / n_layers, 3)})
    cpu = _cpu_seconds(out_dir)
    t = first.total_effect_ci
    return {"model": first.model, "facts": first.n_facts, "failures": len(load_failures(out_dir)), "bucket": bucket,
            "n_layers": n_layers, "layers": list(range(n_layers)), "rows": rows,
            "settings": {"samples": settings.samples, "noise": settings.noise.to_dict(), "window": settings.window},
            "total_effect": {"mean": round(first.total_effect, 4), "ci": [round(t[0], 4), round(t[1], 4)],
                             "clean": round(first.high_score, 4), "corrupted": round(first.low_score, 4)},
            "cpu_s_per_fact": {"mean": round(float(np.mean(cpu)), 1), "median": round(float(np.median(cpu)), 1)}
            if cpu else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("traces", type=Path, help="the --out directory of `factscope trace-dataset`")
    p.add_argument("--bucket", default="last_subject", help="token bucket (default last_subject)")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--note", default="", help="how the traces were made (stored in the result file)")
    add_result_arguments(p, None)
    args = p.parse_args()
    f = figures(args.traces, args.bucket, args.n_boot)
    for row in f["rows"]:
        print(f"{row['label']:<32} peak L{row['peak']} of {f['n_layers']} ({row['relative_depth']:.0%} of the depth) "
              f"{row['values'][row['peak']]:.3f} {row['peak_ci']}; inside its CI: {row['inside_peak_ci']}")
    if args.result_name:
        save_result(args, args.result_name, f, threads=None, note=args.note or f"traces in {args.traces}")


if __name__ == "__main__":
    main()
