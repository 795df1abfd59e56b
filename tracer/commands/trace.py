"""``factscope trace``: causal trace of one prompt, printed and optionally saved as JSON."""
from __future__ import annotations

from pathlib import Path

from . import add_model_arguments, check_output_path, load_model_from_args
from .plan import refuse_too_large
from ..files import write_json_atomic
from ..limits import check_count, check_seed
from ..trace import trace_all
from ..trace_result import KINDS


def register(sub) -> None:
    p = sub.add_parser("trace", help="causal trace: which (token, layer) states restore the answer",
                       description="Corrupt the subject's embeddings, restore one site at a time, and report "
                                   "how much of the clean answer's probability comes back.")
    p.add_argument("--prompt", required=True, help='e.g. "The Eiffel Tower is located in the city of"')
    p.add_argument("--subject", required=True, help='a substring of the prompt, e.g. "The Eiffel Tower"')
    p.add_argument("--kind", default="hidden", choices=[*KINDS, "all"])
    p.add_argument("--samples", type=int, default=10, help="noise samples per restoration (default 10)")
    p.add_argument("--noise", default="3s", help="absolute scale (0.1) or multiple of the subject-embedding std (3s, default)")
    p.add_argument("--noise-mode", default="rome", choices=["rome", "torch"],
                   help="rome: the original code's numpy RandomState draw; torch: a seeded torch.Generator")
    p.add_argument("--uniform", action="store_true", help="uniform noise in [-scale, scale] instead of Gaussian")
    p.add_argument("--replace", action="store_true", help="replace the subject embeddings by noise instead of adding it")
    p.add_argument("--window", type=int, default=10, help="MLP/attention layers restored together (default 10)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--naive", action="store_true", help="one forward pass per restoration (the original code's way)")
    p.add_argument("--top", type=int, default=5, help="how many of the strongest cells to print")
    p.add_argument("--json", type=Path, help="write TraceResult.to_dict() (a list of three for --kind all)")
    p.add_argument("--no-progress", action="store_true")
    add_model_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    check_output_path(args.json, "--json file")
    check_seed(args.seed, "--seed")  # settings that need no model are refused before it loads
    check_count("--samples", args.samples)
    kinds = KINDS if args.kind == "all" else (args.kind,)
    refuse_too_large(args, "trace", prompt=args.prompt, subject=args.subject, samples=args.samples, kinds=kinds,
                     window=args.window, naive=args.naive)  # from the config, before the weights load
    lm = load_model_from_args(args)
    results = trace_all(lm, args.prompt, args.subject, kinds=kinds, samples=args.samples, noise=args.noise,
                        noise_mode=args.noise_mode, uniform_noise=args.uniform, replace=args.replace,
                        window=args.window, seed=args.seed, naive=args.naive, progress=not args.no_progress)
    first = next(iter(results.values()))
    b, e = first.subject_span
    print(f"model {lm.name}: {args.prompt!r} -> {first.answer!r}")
    print(f"subject tokens [{b}, {e}): {''.join(first.tokens[b:e])!r}; noise scale {first.noise.scale:.4f} ({first.noise.mode})")
    print(f"high score (clean) {first.high_score:.4f}   low score (corrupted) {first.low_score:.4f}")
    for kind, r in results.items():
        cells = ", ".join(f"{r.tokens[t]!r}@L{layer}={s:.3f}" for t, layer, s in r.strongest(args.top))
        print(f"{kind:6s} strongest restorations: {cells}   ({r.n_forward} forward passes, {r.seconds:.1f} s)")
    if args.json:
        payload = [r.to_dict() for r in results.values()]
        write_json_atomic(args.json, payload if args.kind == "all" else payload[0])
        print(f"wrote {args.json}")
    return 0
