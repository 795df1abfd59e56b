"""Render the result tables of README.md and docs/*.md from bench/results/*.json.

    python bench/render_docs.py            # rewrite the tables in place
    python bench/render_docs.py --check    # exit 1 (and name the files) when a table is out of date

A table lives between two marker comments in a Markdown file::

    <!-- table:trace_speed -->
    ...whatever is here is replaced...
    <!-- /table -->

``table:NAME`` renders ``bench/results/NAME.json`` with ``RENDERERS[NAME]`` (a table, sometimes a
line of figures after it, and a line naming the file, command and date). Rendering is idempotent:
the text between the markers is a function of the JSON file alone, so a hand-edited number is
overwritten here and fails ``tests/test_render_docs.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tracer.files import write_text_atomic  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"
#: the Markdown files whose tables are rendered
DOCS = ("README.md", "docs/tracing.md", "docs/editing.md", "docs/evaluation.md", "docs/defaults.md",
        "docs/benchmarks.md", "docs/ray.md")
MARKER = re.compile(r"(<!-- table:([A-Za-z0-9_-]+) -->\n)(.*?)(<!-- /table -->)", re.S)


# ------------------------------------------------------------------------------------ formatting


def cell(x: Any) -> str:
    """A table cell: ``|`` escaped, line breaks folded, None as a dash."""
    if x is None:
        return "–"
    return str(x).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines


def num(x: float | None, digits: int = 1, unit: str = "") -> str | None:
    """``1,234.5 s``-style figures; None stays None (a dash)."""
    if x is None:
        return None
    return f"{x:,.{digits}f}{unit}"


def short(x: float | None, digits: int = 3) -> str | None:
    """``.083``: probabilities and effects without the leading zero; 1 stays ``1``."""
    if x is None:
        return None
    if x == 1:
        return "1"
    text = f"{x:.{digits}f}"
    return text.replace("0.", ".", 1) if text.startswith(("0.", "-0.")) else text


def sci(x: float, digits: int = 1) -> str:
    """``2.0e-6``: scientific notation without exponent padding."""
    mantissa, exp = f"{x:.{digits}e}".split("e")
    return f"{mantissa}e{int(exp)}"


def mean_std(d: dict | None) -> str | None:
    return None if d is None else f"{d['mean']:.1f} ± {d['std']:.1f}"


def arrow(before: dict | None, after: dict | None, key: str) -> str | None:
    if before is None or after is None:
        return None
    return f"{before[key]:g} → {after[key]:g}"


def triple(d: dict | None) -> str | None:
    return None if d is None else f"{d['ES']:g} / {d['PS']:g} / {d['NS']:g}"


def method_label(row: dict) -> str:
    return f"{row['method']} (batch {row['batch']})" if row.get("batch") else row["method"]


# ------------------------------------------------------------------------------------ renderers


def trace_speed(r: dict) -> list[str]:
    f = r["figures"]
    naive, batched = f["naive"], f["batched"]
    diff = f.get("max_abs_score_difference")
    peak = "peak GPU memory" if f.get("device") == "cuda" else "peak RSS"
    return table(["mode", "time", "forward passes", peak], [
        ["naive (one forward per restoration, as ROME)", num(naive["seconds"], 1, " s"), num(naive["forwards"], 0),
         num(naive["peak_mib"], 0, " MiB")],
        ["batched", num(batched["seconds"], 1, " s"), num(batched["forwards"], 0), num(batched["peak_mib"], 0, " MiB")],
        ["**speed-up**", f"**{naive['seconds'] / batched['seconds']:.1f}×**", "",
         f"max |score difference| {sci(diff)}" if diff is not None else ""],
    ])


def trace_precision(r: dict) -> list[str]:
    f = r["figures"]
    ref = f["runs"][0]["clean_p"]
    rows = [[run["name"], num(run.get("cpu_s"), 1), f"{run['speedup']:.2f}×", f"{run['clean_p']:.3f}",
             f"{(run['clean_p'] / ref - 1) * 100:+.0f} %", f"{run['max_abs_cell_difference']:.4g}"] for run in f["runs"]]
    g = f["gemm_gflops"]
    return table(["weights", "CPU-s", "speed-up", "clean p", "change", "max \\|cell − float32\\|"], rows) + [
        "", f"Matrix products on one core: float32 {g['float32']:.0f} GFLOP/s, bfloat16 {g['bfloat16']:.0f} GFLOP/s "
            f"({g['bfloat16'] / g['float32']:.1f}×). Fact: “{f['fact']}”, kind {f['kind']}."]


def precision(r: dict) -> list[str]:
    f = r["figures"]
    kinds = list(f["runs"][0]["kinds"])
    rows = []
    for run in f["runs"]:
        ks = run["kinds"].values()
        diffs = [k["max_abs_cell_difference"] for k in ks if "max_abs_cell_difference" in k]
        peaks = [f"{k['peak']['token_text']!r} L{k['peak']['layer']} = {k['peak']['score']:.3f}" for k in ks]
        shared = [k["top5_shared"] for k in ks if "top5_shared" in k]
        rows.append([run["name"], *peaks, f"{next(iter(ks))['high_score']:.4f}",
                     (sci(max(diffs)) if max(diffs) else "0") if diffs else "–",
                     " / ".join(str(x) for x in shared) if shared else "–", num(run["cpu_s"], 0)])
    return table(["weights", *[f"{k} peak cell" for k in kinds], "clean p", "max \\|cell − float32\\|",
                  "top-5 cells shared", "CPU-s"], rows) + [
        "", f"Prompt “{f['prompt']}”, subject “{f['subject']}”, {f['samples']} noise samples, seed {f['seed']}; "
            f"peak cell: token, layer and score; CPU-s: all {len(kinds)} kinds."]


def aggregate_speed(r: dict) -> list[str]:
    def secs(x):
        if isinstance(x, dict):
            return f"<{x['below']:g} s"
        return f"{x:.3g} s" if x < 1 else f"{x:.1f} s"

    rows = [[f"{row['facts']:,} facts, {row['stage']}", secs(row["numpy_s"]), secs(row["numba_s"]), f"{row['ratio']:.2g}×",
             "yes" if row["identical"] else "**no**"] for row in r["figures"]["rows"]]
    return table([f"aggregation ({r['figures']['layers']} layers)", "NumPy", "numba", "ratio", "identical"], rows)


def layer_values(r: dict, label_key: str, digits: int, mean_row: bool = False) -> list[str]:
    f = r["figures"]
    header = ["fact" if label_key == "fact" else "at the last subject token"] + [f"L{i}" for i in f["layers"]]
    with_peak = any("peak" in row for row in f["rows"])
    if with_peak:
        header.append("peak")
    rows = []
    for row in f["rows"]:
        cells = []
        for layer, v in zip(f["layers"], row["values"]):
            text = short(v, digits)
            cells.append(f"**{text}**" if with_peak and layer == row.get("peak") and text is not None else text)
        if with_peak:
            peak = row.get("peak")
            ci = row.get("peak_ci")
            cells.append("(no effect)" if peak is None else
                         f"{peak} [{short(ci[0], digits)}, {short(ci[1], digits)}]" if ci else str(peak))
        rows.append([row[label_key], *cells])
    if mean_row:
        means = [sum(row["values"][i] for row in f["rows"]) / len(f["rows"]) for i in range(len(f["layers"]))]
        rows.append(["mean", *[short(m, digits) for m in means]])
    return table(header, rows)


def known_facts_averages(r: dict) -> list[str]:
    f = r["figures"]
    t, cost, sev, last = f["total_effect"], f["cpu_s_per_fact"], f["severed_early"], f["last_token"]
    lo, hi = sev["layers"]
    return layer_values(r, "label", 3) + [
        "", f"{f['facts']} facts ({f['failures']} failures). Average total effect {t['mean']:.3f} "
            f"[{t['ci'][0]:.3f}, {t['ci'][1]:.3f}] (clean {t['clean']:.3f}, corrupted {t['corrupted']:.3f}). "
            f"Mean hidden-state effect at the last subject token over layers {lo}–{hi}: {sev['hidden']:.3f}; "
            f"{sev['mlp_severed']:.3f} with the MLPs above severed ({sev['mlp_share_removed']:.0%} less), "
            f"{sev['attn_severed']:.3f} with attention severed ({sev['attn_share_removed']:.0%} less). "
            f"At the last token attention peaks at layer {last['attention_peak_layer']} ({last['attention_peak']:.3f}) "
            f"and the hidden state jumps at layer {last['hidden_jump']['layer']} ({last['hidden_jump']['before']:.3f} → "
            f"{last['hidden_jump']['after']:.3f}). "
            f"Cost: {cost['mean']:.1f} CPU-s per fact on average (median {cost['median']:.1f}), "
            f"{f['cpu_hours_total']:.1f} CPU-hours in all."]


def rome_layer_traces(r: dict) -> list[str]:
    return layer_values(r, "fact", 3)


def memit_layer_traces(r: dict) -> list[str]:
    return layer_values(r, "fact", 2, mean_row=True)


def stats_tokens(r: dict) -> list[str]:
    f = r["figures"]
    rows = []
    for row in f["rows"]:
        label = "0 (C = I)" if row["tokens"] == 0 else f"{row['tokens']:,}"
        rows.append([f"**{label}**" if row["tokens"] == f.get("default") else label, f"{row['efficacy']:.2f}",
                     f"{row['paraphrase']:.2f}", f"{row['neighbourhood']:.2f}", f"{row['p_new_rewrite']:.3f}",
                     f"{row['p_new_paraphrase']:.3f}"])
    return table(["C from tokens", "efficacy", "paraphrase", "neighbourhood", "mean P(new) rewrite",
                  "mean P(new) paraphrase"], rows)


def _sweep(r: dict, name: str, fmt: Callable[[float], str]) -> list[str]:
    f = r["figures"]
    short = any("post_norm_shortfall_mean" in row for row in f["rows"])  # models with a post-MLP norm
    rows = []
    for row in f["rows"]:
        if row["value"] is None:
            label = "unedited"
        else:
            label = fmt(row["value"]) + (f" ({row['note']})" if row.get("note") else "")
            if row["value"] == f.get("default"):
                label = f"**{label}**"
        rows.append([label, *[f"{row[k]:.1f}" for k in ("S", "ES", "PS", "NS", "EM", "PM", "NM")],
                     *([f"{row['post_norm_shortfall_mean']:.0%} / {row['post_norm_shortfall_max']:.0%}"
                        if "post_norm_shortfall_mean" in row else None] if short else [])])
    return table([name, "S", "ES", "PS", "NS", "EM", "PM", "NM", *(["post-norm shortfall (mean / max)"] if short else [])], rows)


def memit_lambda(r: dict) -> list[str]:
    return _sweep(r, "λ", lambda v: f"{v:,.0f}")


def ftl_epsilon(r: dict) -> list[str]:
    return _sweep(r, "ε (= lr)", lambda v: f"{v:.0e}".replace("e-0", "e-"))


def counterfact(r: dict) -> list[str]:
    rows = [[method_label(row), row["n"], f"{row['S']:.1f}",
             *[mean_std(row.get(k)) for k in ("ES", "PS", "NS", "EM", "PM", "NM", "GE", "RS")],
             num(row["s_per_edit"], 2)] for row in r["figures"]["rows"]]
    return table(["method", "n", "S", "ES", "PS", "NS", "EM", "PM", "NM", "GE", "RS", "s / edit"], rows)


def zsre(r: dict) -> list[str]:
    rows = [[method_label(row), row["n"], mean_std(row["efficacy"]), mean_std(row["paraphrase"]),
             mean_std(row["specificity"]), num(row["s_per_edit"], 2)] for row in r["figures"]["rows"]]
    return table(["method", "n", "Efficacy", "Paraphrase", "Specificity", "s / edit"], rows)


def memit_scale(r: dict) -> list[str]:
    rows = []
    for row in r["figures"]["rows"]:
        n, reused = row["n"], row.get("z_reused", 0)
        if row.get("cpu_s_estimated"):
            cpu = f"≈ {row['cpu_s']:,.0f} s (≈ {row['cpu_s'] / n:.1f} s/edit)"
        elif reused and row.get("z_reused_cpu_s") is not None:
            total = row["cpu_s"] + row["z_reused_cpu_s"]
            cpu = f"{row['cpu_s']:,.1f} s + {row['z_reused_cpu_s']:,.0f} s of reused z ({total / n:.1f} s/edit)"
        elif reused >= n:
            cpu = f"{row['cpu_s']:,.1f} s (all z reused)"
        elif reused:
            cpu = f"{row['cpu_s']:,.1f} s ({row['cpu_s'] / (n - reused):.1f} s/new edit)"
        else:
            cpu = f"{row['cpu_s']:,.1f} s ({row['cpu_s'] / n:.1f} s/edit)"
        if "z_ahead_cpu_s" in row:
            z = f"≈ {row['z_ahead_cpu_s']:,.0f} CPU-s ahead ({row['z_ahead_note']})"
        elif reused and row.get("z_reused_cpu_s"):
            z = f"{row['z_s']:,.1f} s + {row['z_reused_cpu_s']:,.0f} CPU-s reused"
        else:
            z = f"{row['z_s']:,.1f} s" + (f" ({n - reused} new)" if reused else "")
        threads = row.get("threads")
        update = f"{row['update_s']:,.1f} s" + (f" ({threads} threads)" if threads and threads != r.get("threads") else "")
        peak = f"{row['peak_rss_mb'] / 1024:.1f} GB" if "peak_rss_mb" in row else f"{row['peak_rss_gb']:.1f} GB"
        ppl = row.get("perplexity")
        rows.append([f"{n:,}", num(row.get("wall_s"), 1, " s"), cpu, z, update, peak,
                     *[arrow(row["before"], row["after"], k) for k in ("ES", "PS", "NS")],
                     arrow(row["before"], row["after"], "S") if "S" in row["before"] and "S" in row["after"] else None,
                     f"{ppl['before']:.2f} → {ppl['after']:.2f}" if ppl else None])
    return table(["edits", "wall", "CPU", "z optimisation", "keys + solve", "peak RSS", "ES", "PS", "NS", "S", "perplexity"], rows)


def memit_sequential(r: dict) -> list[str]:
    f = r["figures"]
    rows = []
    for row in f["rows"]:
        norms = " ".join(f"{v:.3f}" for v in row["norm_ratio"]) if row["norm_ratio"] else "1"
        this = row["this_batch"]
        this_text = None if this is None else \
            f"{this['before']['ES']:g}/{this['before']['PS']:g}/{this['before']['NS']:g} → " \
            f"{this['after']['ES']:g}/{this['after']['PS']:g}/{this['after']['NS']:g}"
        first = triple(row["first_batch"]) + (" (unedited)" if row["edits"] == 0 else "")
        rows.append([row["edits"], norms, f"{row['perplexity']:.2f}", this_text, first])
    layers = f"{f['layers'][0]} … {f['layers'][-1]}"
    return table(["edits", f"‖W‖ / ‖W₀‖, layers {layers}", "perplexity", "this batch: ES / PS / NS",
                  "first batch: ES / PS / NS"], rows)


def _es_ps_ns(d: dict | None) -> str | None:
    return None if d is None else f"{d['ES']:g}/{d['PS']:g}/{d['NS']:g}"


def _range(values: list, digits: int = 0, pct: bool = False) -> str:
    fmt = (lambda v: f"{v * 100:.{digits}f}") if pct else (lambda v: f"{v:,.{digits}f}")
    lo, hi = fmt(min(values)), fmt(max(values))
    return (lo if lo == hi else f"{lo}–{hi}") + (" %" if pct else "")


def sequential_editing_sweep(r: dict) -> list[str]:
    f = r["figures"]
    rows = []
    for row in f["sweep"]:
        mode, _, value = row["update"].partition(":")
        label = "MEMIT (λ C)" if mode == "memit" else f"AlphaEdit, {mode} {value}"
        rows.append([label, _range(row["null_dim"]) if "null_dim" in row else "–",
                     _range(row["null_energy"], 1, True) if "null_energy" in row else "–",
                     f"{_es_ps_ns(row['before'])} → {_es_ps_ns(row['after'])}", f"{row['perplexity']:.2f}",
                     f"{max(row['norm_ratio']):.4f}"])
    return table(["update", "null space (of 1,536)", "its share of E[‖k‖²]", f"first {f['batch']}: ES / PS / NS",
                  f"perplexity (unedited {f['perplexity_unedited']:.2f})", "max ‖W‖ / ‖W₀‖"], rows)


def sequential_editing(r: dict) -> list[str]:
    f = r["figures"]
    rows = []
    for label, method_rows in f["sequential"].items():
        for row in method_rows:
            if "edits" not in row:
                continue
            if row["edits"] == 0:
                rows.append([label, 0, "1", f"{row['perplexity']:.2f}", "–", "–",
                             f"{_es_ps_ns(row['first_batch'])} (unedited)", "–"])
                continue
            this = row["this_batch"]
            rows.append([label, f"{row['edits']:,}", f"{max(row['norm_ratio']):.4f}", f"{row['perplexity']:.2f}",
                         f"{row['entropy']:.2f}", f"{_es_ps_ns(this['before'])} → {_es_ps_ns(this['after'])}",
                         _es_ps_ns(row["first_batch"]),
                         "–" if row["retention"] is None else f"{row['retention'] * 100:.0f} %"])
    lines = table(["method", "edits", "max ‖W‖ / ‖W₀‖", "perplexity", "entropy", "this batch: ES / PS / NS",
                   "first batch: ES / PS / NS", "retention"], rows) if rows else []
    if f.get("single"):
        single = table(["one batch", "edits", "layers", f"ES / PS / NS of the first {f['eval']} (unedited → edited)",
                        "perplexity", "wall (z optimised in it)"], [
            [label, f"{row['n']:,}", f"{row['layers'][0]}–{row['layers'][-1]}",
             f"{_es_ps_ns(row['before'])} → {_es_ps_ns(row['after'])}",
             f"{f['perplexity_unedited']:.2f} → {row['perplexity']:.2f}",
             f"{row['wall_s']:,.0f} s ({row['n'] - (row['z_reused'] or 0):,})"]
            for label, row in f["single"].items()])
        lines += ([""] if lines else []) + single
    return lines


def rome_sequential(r: dict) -> list[str]:
    rows = []
    for row in r["figures"]["rows"]:
        b, a = row["before"], row["after"]
        first = row["first"]
        first_text = {"same": "(the same cases)", None: None}.get(first, first) if not isinstance(first, dict) else triple(first)
        wall = f"{row['wall_s']:,} s"
        if row.get("wall_text"):
            wall = row["wall_text"]
        elif row.get("resumed_from") is not None:
            wall = f"+{row['wall_s']:,} s for edits {row['resumed_from'] + 1}–{row['edits']}"
        rows.append([row["edits"], f"{row['norm_ratio']:.3f}", f"{row['perplexity']:.2f}",
                     f"{b['ES']:g}/{b['PS']:g}/{b['NS']:g} → {a['ES']:g}/{a['PS']:g}/{a['NS']:g}", first_text, wall])
    return table(["edits", "‖W₄‖ / ‖W₀‖", "perplexity", "last ≤ 100: ES / PS / NS unedited → edited",
                  "first 100: ES / PS / NS", "wall"], rows)


def z_order(r: dict) -> list[str]:
    f = r["figures"]
    what = f"{f['requests']:,} requests" + (f" ({f['rows']:,} rows, layer {f['layer']})" if f["stage"] == "keys" else
                                            f", {f['steps']} v* steps")
    real, cpu = f["real_tokens"], f["cpu_s"]
    extra = f" (keys equal to {sci(f['max_abs_difference'], 0)})" if f.get("max_abs_difference") is not None else ""
    return table(["stage", "work", "real tokens fed: file order → grouped", "CPU-s file order", "CPU-s grouped", "speed-up"], [
        [f["stage"], what, f"{real['file_order'] * 100:.0f} % → {real['grouped'] * 100:.0f} %",
         " / ".join(f"{x:.1f}" for x in cpu["file_order"]), " / ".join(f"{x:.1f}" for x in cpu["grouped"]),
         f"**{f['ratio_file_order_over_grouped']:.2f}×**{extra}"]])


def edit_speed(r: dict) -> list[str]:
    f = r["figures"]
    v, peak = f["v_star_s"], f["peak_over_load_mb"]
    return table(["engine", f"v* optimisation ({f['steps']} steps)", "peak RSS above the loaded model"], [
        ["fast (prefix cache, blocks above the edit layer only)", num(v["fast"], 1, " s"), f"+{peak['fast']:,.0f} MB"],
        ["reference (ROME's full forward passes)", num(v["reference"], 1, " s"), f"+{peak['reference']:,.0f} MB"],
        ["**speed-up**", f"**{v['reference'] / v['fast']:.1f}×**", ""]])


def ray_scale(r: dict) -> list[str]:
    f = r["figures"]
    rows = [[f"{run['workers']} worker{'s' if run['workers'] > 1 else ''}", num(run["wall_s"], 1, " s"),
             num(run["task_cpu_s"], 1, " s"), f"{run['overhead_per_item_s']:.3f} s", f"{run['round_trip_s'] * 1000:.1f} ms",
             num(run["pool_start_s"], 1, " s")] for run in f["runs"]]
    rows.append(["**speed-up**", f"**{f['speedup']:.2f}×**", "", "", "", ""])
    load = f["load_average"][0]
    return table(["Ray workers", "trace wall time", "CPU-s in the workers", "overhead per fact", "empty-task round trip",
                  "pool start (once)"], rows) + [
        "", f"{f['facts']} known facts, kind {f['kind']}, {f['samples']} samples, embedded model, one torch thread per "
            f"worker, one local cluster of {f['cluster_cpus']} CPUs (started in {f['cluster_start_s']:.1f} s); the two "
            f"runs wrote {'the same' if f['same_files'] else '**different**'} facts/*.json bytes; load average at the "
            f"end {load:.2f}."]


def known_facts_layers(r: dict) -> list[str]:
    f = r["figures"]
    t, cost = f["total_effect"], f.get("cpu_s_per_fact")
    peaks = "; ".join(f"{row['label']} peaks at layer {row['peak']} of {f['n_layers']} ({row['relative_depth']:.0%} of "
                      f"the depth; inside its interval: layers {', '.join(map(str, row['inside_peak_ci']))})"
                      for row in f["rows"])
    spent = f" Cost: {cost['mean']:.1f} CPU-s per fact on average (median {cost['median']:.1f})." if cost else ""
    return layer_values(r, "label", 3) + [
        "", f"{f['facts']} facts of {f['model']} ({f['failures']} failures). Average total effect {t['mean']:.3f} "
            f"[{t['ci'][0]:.3f}, {t['ci'][1]:.3f}] (clean {t['clean']:.3f}, corrupted {t['corrupted']:.3f}). "
            f"{peaks}.{spent}"]


def model_load(r: dict) -> list[str]:
    f = r["figures"]
    rows = []
    for row in f["rows"]:
        w, c = row["warm"], row.get("cold")
        rows.append([f"`{row['model']}`", f"{w['layers']} × {w['hidden']}", f"{w['parameters'] / 1e6:.0f} M",
                     num(c["cache_mb"], 0, " MB") if c else None, num(c["seconds"], 0, " s") if c else None,
                     num(c["peak_rss_mb"], 0, " MB") if c else None, num(w["seconds"], 1, " s"),
                     num(w["rss_loaded_mb"], 0, " MB"), num(w["rss_after_forward_mb"], 0, " MB"),
                     f"{cell(repr(w['answer']))} {short(w['p'])}"])
    return table(["model", "layers × width", "parameters", "converted cache", "first load (conversion)",
                  "its peak RSS", "cached load", "RSS loaded", "RSS after a forward pass", "answer"], rows)


def mib(n: float | None) -> str | None:
    return None if n is None else f"{n / 2**20:,.0f} MiB"


def plan_accuracy(r: dict) -> list[str]:
    f = r["figures"]
    rows = [[name, mib(j["planned_peak_bytes"]), mib(j["measured_peak_bytes"]), f"{j['peak_error']:+.1%}",
             j["largest_phase"], num(j["planned_seconds"], 0, " s"), num(j["measured_cpu_s"], 0, " s"),
             num(j["measured_wall_s"], 0, " s")] for name, j in f["jobs"].items()]
    return table(["job", "planned peak", "measured peak RSS", "error", "largest phase", "planned time", "CPU time",
                  "wall time"], rows) + [
        "", f"{f['model']} on the {f['device']}; the plan from `factscope plan --json` in its own process, the job in "
            f"another (peak resident set from `os.wait4`); load average at the end {f['load_average'][0]:.1f}."]


def trace_speed_rome(r: dict) -> list[str]:
    f = r["figures"]
    rows = [[label, num(f[m]["seconds"], 1, " s"), num(f[m]["cpu_seconds"], 1, " s"), num(f[m]["forwards"], 0),
             num(f[m]["peak_mib"], 0, " MiB")]
            for m, label in (("rome", "ROME's own code (`calculate_hidden_flow`, from a checkout)"),
                             ("naive", "naive (one forward per restoration)"), ("batched", "batched"))]
    b = f["batched"]
    rows += [[f"**batched vs {label}**", f"**{f[m]['seconds'] / b['seconds']:.1f}×**",
              f"**{f[m]['cpu_seconds'] / b['cpu_seconds']:.1f}×**", "",
              f"max |score difference| {sci(f[key])}"]
             for m, label, key in (("rome", "ROME", "rome_max_abs_score_difference"),
                                   ("naive", "naive", "max_abs_score_difference"))]
    return table(["mode", "time", "CPU time", "forward passes", "peak RSS"], rows) + [
        "", "Adapted to import ROME's code here: " + "; ".join(f["rome_adapted"]) + "."]


def naive_vs_rome(r: dict) -> list[str]:
    f = r["figures"]
    cpu, wall = f["ms_per_forward"], f["wall_ms_per_forward"]
    counts, base = list(cpu), "ROME's trace_with_patch"

    def entry(n: str, name: str) -> str:
        ratio = "" if name == base else f", {cpu[n][name] / cpu[n][base]:.2f}×"
        return f"{cpu[n][name]:.0f} ms ({wall[n][name]:.0f} ms{ratio})"

    rows = [[name] + [entry(n, name) for n in counts] for name in cpu[counts[0]]]
    header = ["forward pass"] + [f"{n} thread{'' if n == '1' else 's'}: CPU (wall, CPU vs ROME)" for n in counts]
    return table(header, rows) + [
        "", f"{f['cells']} restorations of the embedded model ({f['rows']} rows x {f['tokens']} tokens), "
            f"{f['rounds']} interleaved rounds; max |score difference| ROME vs factscope {sci(f['max_abs_score_difference'])}."]


def gpu_suite(r: dict) -> list[str]:
    f = r["figures"]
    rows = [[name, j["model"], j["dtype"], num(j.get("seconds"), 1, " s"), mib(j["planned_device_bytes"]),
             mib(j.get("peak_bytes")), f"{j['peak_error']:+.1%}" if "peak_error" in j else j.get("error")]
            for name, j in f["jobs"].items()]
    lines = table(["job", "model", "dtype", "time", "planned peak", "measured peak", "error"], rows)
    if "trace_speedup" in f:
        lines += ["", f"Batched trace {f['trace_speedup']:.1f}× faster than naive (max |score difference| "
                      f"{sci(f['trace_max_abs_score_difference'])}); the suite took {f['wall_s']:.0f} s."]
    return lines


def counterfact_generation(r: dict) -> list[str]:
    """Teacher-forced and generated / CounterFact+ metrics side by side (ES beside ES-g, ...)."""
    def ms(d: dict | None, digits: int = 1) -> str | None:
        return None if d is None else f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"

    rows = [[method_label(row), row["n"], None if row.get("S") is None else f"{row['S']:.1f}",
             ms(row.get("ES")), ms(row.get("ES-g")), ms(row.get("PS")), ms(row.get("PS-g")), ms(row.get("NS")),
             ms(row.get("NS+")), ms(row.get("NKL"), 3), ms(row.get("GE")), ms(row.get("RS")), num(row.get("s_per_edit"), 2)]
            for row in r["figures"]["rows"]]
    return table(["method", "n", "S", "ES", "ES-g", "PS", "PS-g", "NS", "NS+", "NKL", "GE", "RS", "s / edit"], rows)


def rome_variants(r: dict) -> list[str]:
    """ROME's update form and templates: single edits (evaluate runs), then sequential edits."""
    f = r["figures"]
    cols = ["ES", "PS", "NS", "EM", "PM", "ES-g", "PS-g", "NS+"]
    lines = []
    if f["single"]:
        rows = [[row["variant"], row["n"], *[num(row.get(c)) for c in ["S", *cols]], num(row.get("NKL"), 3),
                 num(row.get("seconds_per_edit"), 1, " s")] for row in f["single"]]
        lines += ["Single edits (each on the unedited model):", "",
                  *table(["variant", "n", "S", *cols, "NKL", "time / edit"], rows)]
    if f["sequential"]:
        rows = [[row["variant"], row["n"], *[num(row.get(c)) for c in cols],
                 f"{row['perplexity'][0]:.2f} → {row['perplexity'][1]:.2f}"] for row in f["sequential"]]
        lines += ["", f"Sequential edits ({f['sequential'][0]['n']} one after another, then all measured together):", "",
                  *table(["variant", "n", *cols, "held-out perplexity"], rows)]
    return lines


def _span(layers: list[int]) -> str:
    return f"{layers[0]}–{layers[-1]}"


def calibration(r: dict) -> list[str]:
    rows = []
    for m in r["figures"]["models"]:
        t = m["table"]
        lo, hi = m["peak_interval"]
        rows.append([m["model"], f"{m['rome_layer']} ({m['peak_share']:.0%} of resamples; {lo}–{hi})",
                     _span(m["memit_layers"]), f"{m['lambda']:,.0f}", f"{m['epsilon']:g}",
                     f"{t['rome_layer']} · {_span(t['memit_layers'])} · {t['lambda']:,.0f} · {t['epsilon']:g} ({t['source']})",
                     f"{sum(m['seconds'].values()):,.0f} s"])
    return table(["model", "ROME layer (peak share; 95 % interval)", "MEMIT layers", "λ", "FT-L ε = lr",
                  "table's defaults: layer · MEMIT · λ · ε", "time"], rows)


def layer_sweep(r: dict) -> list[str]:
    f = r["figures"]
    names = {"rewrite_score": "rewrite score (Hase et al.)", "paraphrase_score": "paraphrase score",
             "neighborhood_success": "neighbourhood score NS", "rewrite_gen_success": "ES-g (greedy text)"}
    rows = []
    for key, c in f["correlations"].items():
        def ci(stat: dict) -> str:
            lo, hi = stat["ci"]
            return f"{stat['value']:+.2f} [{lo:+.2f}, {hi:+.2f}]"

        rows.append([names.get(key, key), ci(c["within_layer_pearson"]), ci(c["spearman"]),
                     f"{c['r2_layer']['value']:.2f} → {c['r2_layer_and_effect']['value']:.2f}",
                     f"{c['same_peak_share']:.0%}"])
    lines = table(["edit score", "within-layer r [95 % CI]", "pooled Spearman ρ [95 % CI]",
                   "R²: layer → layer + trace", "facts whose trace and edit peak at the same layer"], rows)
    means = f["correlations"]["rewrite_score"]["mean_by_layer"]
    lines += ["", f"{f['n_facts']} known CounterFact facts, layers {', '.join(map(str, f['layers']))}; mean over facts by layer:", ""]
    lines += table(["", *[f"L{layer}" for layer in f["layers"]]],
                   [["MLP trace effect", *[f"{x:.3f}" for x in means["effect"]]],
                    ["rewrite score", *[f"{x:.2f}" for x in means["rewrite_score"]]]])
    return lines


RENDERERS: dict[str, Callable[[dict], list[str]]] = {
    "trace_speed": trace_speed, "trace_speed_busy": trace_speed, "trace_precision": trace_precision,
    "precision": precision, "aggregate_speed": aggregate_speed, "known_facts_averages": known_facts_averages,
    "rome_layer_traces": rome_layer_traces, "memit_layer_traces": memit_layer_traces, "stats_tokens": stats_tokens,
    "memit_lambda": memit_lambda, "ftl_epsilon": ftl_epsilon, "counterfact": counterfact, "zsre": zsre,
    "memit_scale": memit_scale, "memit_sequential": memit_sequential, "rome_sequential": rome_sequential,
    "z_order": z_order, "z_order_keys": z_order, "edit_speed": edit_speed, "ray_scale": ray_scale,
    "known_facts_averages_gemma3": known_facts_layers, "known_facts_averages_gemma3_w6": known_facts_layers,
    "model_load": model_load,
    "plan_accuracy": plan_accuracy, "trace_speed_rome": trace_speed_rome, "gpu_suite": gpu_suite,
    "naive_vs_rome": naive_vs_rome,
    "sequential_editing": sequential_editing, "sequential_editing_b50": sequential_editing,
    "sequential_editing_sweep": sequential_editing_sweep, "sequential_editing_single2000": sequential_editing,
    "alphaedit_counterfact": counterfact_generation, "sequential_editing_energy": sequential_editing,
    "counterfact_generation": counterfact_generation, "calibration": calibration, "layer_sweep": layer_sweep,
    "rome_variants": rome_variants, "memit_lambda_gemma3": memit_lambda, "ftl_epsilon_gemma3": ftl_epsilon,
}


# ------------------------------------------------------------------------------------ documents


def provenance(r: dict, name: str, doc: Path, results_dir: Path) -> str:
    """One line under a table: the JSON file (linked relative to ``doc``), command, date, threads, machine."""
    link = os.path.relpath(results_dir / f"{name}.json", doc.parent).replace(os.sep, "/")
    date = str(r.get("date") or "date not recorded")
    date = date[:10] if re.match(r"^\d{4}-\d\d-\d\dT", date) else date
    parts = [date]
    if r.get("threads"):
        parts.append(f"{r['threads']} torch thread{'s' if r['threads'] != 1 else ''}")
    m = r.get("machine") or {}
    where = m.get("gpu") or ", ".join(str(x) for x in (m.get("note") or m.get("cpu"),) if x)
    if where:
        parts.append(where)
    if r.get("commit"):
        parts.append(f"commit {r['commit'][:7]}" + (" (with local changes)" if r.get("dirty") else ""))
    if r.get("source"):
        parts.append("transcribed from an earlier README")
    command = f"`{r['command']}`" if r.get("command") else "command not recorded"
    text = "; ".join(parts).replace("<", "&lt;")
    return f"<sub>Source: [{name}.json]({link}): {command}; {text}.</sub>"


def render_block(name: str, doc: Path, results_dir: Path = RESULTS_DIR) -> str:
    """The Markdown between the markers of table ``name`` in ``doc``."""
    if name not in RENDERERS:
        raise KeyError(f"{doc}: no renderer for table {name!r}; known: {', '.join(sorted(RENDERERS))}")
    r = json.loads((results_dir / f"{name}.json").read_text(encoding="utf-8"))
    lines = RENDERERS[name](r)
    return "\n".join(lines) + "\n\n" + provenance(r, name, doc, results_dir) + "\n"


def render_text(text: str, doc: Path, results_dir: Path = RESULTS_DIR) -> str:
    """``text`` with every marked table rendered from ``results_dir``."""
    return MARKER.sub(lambda m: m.group(1) + render_block(m.group(2), doc, results_dir) + m.group(4), text)


def tables_in(text: str) -> list[str]:
    return [m.group(2) for m in MARKER.finditer(text)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when a file is out of date")
    args = ap.parse_args(argv)
    stale = []
    for rel in DOCS:
        doc = ROOT / rel
        text = doc.read_text(encoding="utf-8")
        new = render_text(text, doc)
        if new != text:
            stale.append(rel)
            if not args.check:
                write_text_atomic(doc, new)
    if stale:
        print(("out of date: " if args.check else "rendered: ") + ", ".join(stale))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
