"""``factscope calibrate``: ROME / MEMIT / FT-L defaults derived from the model itself, written to a settings file."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import add_model_arguments, load_model_from_args
from .plan import refuse_too_large
from ..edit.calibrate import WRITE_FRACTION, calibrate, check_settings
from ..edit.defaults import MEASURED, ModelIdentity, calibration_path, table_defaults


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate", help="derive the edit layer(s), MEMIT's λ and FT-L's ε from a model; write its settings file",
        description="Traces known facts (edit layers, with bootstrap intervals), weighs λC against KKᵀ of a batch of "
                    "their keys (λ) and reads the weights' scale through their keys (FT-L's ε); writes the settings "
                    "file that `edit`, `evaluate` and the panels use for every model of this identity that no "
                    "measured row matches (`factscope defaults` shows which applies).")
    add_model_arguments(p)
    p.add_argument("--facts", type=Path, default=None, help="known_1000.json-format facts (default: the data folder's)")
    p.add_argument("--n-facts", type=int, default=20, help="known facts to trace (default 20)")
    p.add_argument("--samples", type=int, default=5, help="noise samples per trace (default 5)")
    p.add_argument("--batch", type=int, default=20, help="known facts whose keys make the typical MEMIT batch (default 20)")
    p.add_argument("--stats", choices=("cache", "identity"), default="cache",
                   help="key statistics C: cached second moment over Wikipedia (default) or C = I")
    p.add_argument("--stats-tokens", type=int, default=100_000, help="tokens of C (default 100,000, as MEMIT's)")
    p.add_argument("--write", type=float, default=WRITE_FRACTION,
                   help=f"mean write fraction that sets λ (default {WRITE_FRACTION:.3f}; see docs/defaults.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="settings file to write (default: $FACTSCOPE_CACHE/calibration/<identity key>.json, "
                        "where edit and evaluate find it)")
    p.add_argument("--json", action="store_true", help="print the settings file instead of the summary")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_settings(n_facts=args.n_facts, samples=args.samples, batch=args.batch, write=args.write, seed=args.seed)
    if args.stats != "identity":  # the largest part: the key statistics of the edit layers
        refuse_too_large(args, "stats", stats_tokens=args.stats_tokens)
    lm = load_model_from_args(args)
    cal = calibrate(lm, n_facts=args.n_facts, samples=args.samples, batch=args.batch,
                    stats="identity" if args.stats == "identity" else None, stats_tokens=args.stats_tokens,
                    facts_path=args.facts, write=args.write, seed=args.seed)
    path = cal.save(args.out)
    if args.json:
        print(json.dumps(cal.to_dict(), indent=1))
        return 0
    print(cal.describe())
    identity = ModelIdentity.of(lm)
    measured = next((m for m in MEASURED if m.matches(identity)), None)
    table = table_defaults(identity, measured)
    print(f"table's defaults ({'measured on ' + measured.model if measured else 'scaling rule'}): ROME layer "
          f"{table.rome['layer']}, MEMIT layers {list(table.memit['layers'])} λ {table.memit['mom2_weight']:g}, "
          f"FT-L ε {table.ftl['norm_constraint']:g}")
    print(f"settings -> {path}")
    if args.out is not None and path != calibration_path(identity):
        print("used where passed as defaults_for(lm, settings=PATH); copy it to "
              f"{calibration_path(identity)} to make it this model's default")
    elif measured is not None:
        print(f"{measured.model} has measured settings; they stay the defaults (pass this file as settings= to use it)")
    else:
        print("edit, evaluate and the panels now use these settings for this model (factscope defaults shows them)")
    return 0
