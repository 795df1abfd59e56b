"""Calibrated defaults beside the table's (hand-measured or scaled) ones, for the docs.

    factscope calibrate --model smollm2-135m --out out/cal/smollm2.json
    factscope calibrate --model gemma3-270m --out out/cal/gemma.json
    python bench/calibration.py out/cal/smollm2.json out/cal/gemma.json --command "factscope calibrate ..."

Reads settings files written by ``factscope calibrate`` and writes ``bench/results/calibration.json``:
per model the calibrated ROME layer (with its bootstrap peak share and interval), MEMIT layers, λ
and FT-L ε, the time each step took, and the defaults the table gives the same identity
(:func:`tracer.edit.defaults.table_defaults`: measured, else the scaling rule) for comparison.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results import add_result_arguments, save_result  # noqa: E402
from tracer.edit.defaults import MEASURED, ModelIdentity, read_settings, table_defaults  # noqa: E402


def entry(path: Path) -> dict:
    d = read_settings(path)
    identity = ModelIdentity.from_dict(d["identity"])
    measured = next((m for m in MEASURED if m.matches(identity)), None)
    table = table_defaults(identity, measured)
    layers = d["measurements"]["layers"]
    return {"model": d["model"], "identity": d["identity"], "date": d["date"],
            "rome_layer": d["rome"]["layer"], "peak_share": layers["peak_share"][d["rome"]["layer"]],
            "peak_interval": layers["peak_interval"], "layer_mean": layers["mean"],
            "layer_ci": [layers["ci_low"], layers["ci_high"]],
            "memit_layers": d["memit"]["layers"], "lambda": d["memit"]["mom2_weight"],
            "lambda_per_layer": {k: v["lambda"] for k, v in d["measurements"]["lambda"].items()},
            "epsilon": d["ftl"]["norm_constraint"], "epsilon_raw": d["measurements"]["epsilon"]["epsilon"],
            "weight_std": d["measurements"]["epsilon"]["weight_std"],
            "seconds": d["seconds"], "settings": d["settings"],
            "table": {"source": "measured on " + measured.model if measured else "scaling rule",
                      "rome_layer": table.rome["layer"], "memit_layers": list(table.memit["layers"]),
                      "lambda": table.memit["mom2_weight"], "epsilon": table.ftl["norm_constraint"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("settings", type=Path, nargs="+", help="settings files of factscope calibrate")
    ap.add_argument("--command", default=None, help="the calibrate commands (recorded in the result)")
    add_result_arguments(ap, "calibration")
    args = ap.parse_args()
    models = [entry(p) for p in args.settings]
    save_result(args, args.result_name, {"models": models}, command=args.command,
                threads=models[0]["settings"].get("torch_threads"))
    for m in models:
        print(json.dumps({k: m[k] for k in ("model", "rome_layer", "memit_layers", "lambda", "epsilon", "table")}))


if __name__ == "__main__":
    main()
