"""One GPU check, each job's peak memory beside the planner's estimate (run by ``bench/gpu_suite.sh``).

    bash bench/gpu_suite.sh                        # one GPU: about 5 minutes on an H200
    python bench/gpu_suite.py --tiny --device cpu --no-result --json out.json    # the same jobs, tiny, on a CPU

Jobs, each in its own process (so each peak is its own):

- ``trace_batched``, ``trace_naive``: a causal trace of one prompt (all three kinds, 10 samples) on a
  GPT-2-XL-shaped model: the cached ``gpt2-xl`` when there is one, else random weights;
- ``rome``: one ROME edit, and ``memit``: one MEMIT batch of 1,000 edits, on a Llama-shaped model
  of 1.24 B parameters (Llama 3.2 1B's sizes) with random weights in bfloat16.

Requests and the tokenizer are made here (no dataset, no download): requests name numbered
subjects, and a byte-level BPE tokenizer is trained on their text in well under a second. Key
statistics are C = I (``--stats identity``), which the plan knows. The planner reads each model
from a folder holding only its config and tokenizer (:func:`tracer.models.model_skeleton`); the
peak is ``torch.cuda.max_memory_allocated`` on a GPU, the child's peak resident set on a CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import add_result_arguments, save_result  # noqa: E402
from tracer.files import write_directory_atomic  # noqa: E402

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
CITIES = (" Paris", " Rome", " London", " Berlin", " Madrid", " Vienna", " Lisbon", " Prague")
TEMPLATES = ("{} is located in the city of", "{} was born in", "The headquarters of {} are in", "{} works in")
#: model shapes: (family, sizes) full and --tiny
SHAPES = {
    "gpt2-xl": {"full": dict(n_embd=1600, n_layer=48, n_head=25, n_positions=1024, vocab_size=50257),
                "tiny": dict(n_embd=64, n_layer=4, n_head=4, n_positions=128, vocab_size=1000)},
    "llama-1b": {"full": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                              num_key_value_heads=8, vocab_size=128256, max_position_embeddings=2048,
                              tie_word_embeddings=True),
                 "tiny": dict(hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256,
                              tie_word_embeddings=True)},
}
JOBS = {"trace_batched": "gpt2-xl", "trace_naive": "gpt2-xl", "rome": "llama-1b", "memit": "llama-1b"}


def requests(n: int) -> list[dict]:
    return [{"prompt": TEMPLATES[i % len(TEMPLATES)], "subject": f"Building number {i}", "target_new": CITIES[i % len(CITIES)]}
            for i in range(n)]


def make_folder(kind: str, size: str, folder: Path, n_requests: int) -> Path:
    """A model folder holding only a config and a tokenizer (no weights): what the planner reads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, LlamaConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    texts = [PROMPT] + [r["prompt"].replace("{}", r["subject"]) + r["target_new"] for r in requests(min(n_requests, 200))]
    tok.train_from_iterator(texts * 4, trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                           special_tokens=["<|endoftext|>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")
    sizes = SHAPES[kind][size]
    ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}  # the tokenizer's <|endoftext|>
    config = GPT2Config(**sizes, **ids) if kind == "gpt2-xl" else LlamaConfig(**sizes, **ids)
    def fill(d: Path) -> None:
        config.save_pretrained(d)
        fast.save_pretrained(d)

    return write_directory_atomic(folder / kind, fill, exist_ok=True)


def real_gpt2_xl() -> str | None:
    """``gpt2-xl`` when the local Hugging Face cache has it (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return "gpt2-xl" if isinstance(try_to_load_from_cache("gpt2-xl", "model.safetensors"), str) else None
    except Exception:  # noqa: BLE001 (no hub library, no cache: random weights)
        return None


def job_sizes(job: str, args) -> dict:
    """What the planner is told about each job (the same settings the child runs)."""
    if job.startswith("trace"):
        return {"prompt": PROMPT, "subject": SUBJECT, "samples": 10, "kinds": ("hidden", "mlp", "attn"),
                "naive": job == "trace_naive"}
    if job == "rome":
        return {"prompt": TEMPLATES[0], "subject": SUBJECT, "target": " Rome", "stats_tokens": 0, "check": False}
    return {"requests": requests(args.edits), "stats_tokens": 0, "memory_mb": args.memory_mb}


def child(args) -> None:
    """Run one job in this process; print its seconds and peak as one JSON line."""
    import torch

    from tracer.edit import EditRequest, MemitHyperParams, ROMEHyperParams, compute_memit, rome_edit
    from tracer.layers import layer_map_for
    from tracer.models import LanguageModel, load_model, model_skeleton
    from tracer.trace import trace_all

    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), torch.bfloat16 if args.job in ("rome", "memit") and not args.tiny else torch.float32
    if args.model_name:
        lm = load_model(args.model_name, device=device, dtype=dtype)
    else:
        skeleton = model_skeleton(args.folder, dtype)
        torch.manual_seed(0)
        from transformers import AutoModelForCausalLM

        with device:  # random weights made on the device itself
            model = AutoModelForCausalLM.from_config(skeleton.model.config, dtype=dtype).eval().requires_grad_(False)
        lm = LanguageModel(model, skeleton.tokenizer, layer_map_for(model), Path(args.folder).name)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    if args.job.startswith("trace"):
        out = trace_all(lm, PROMPT, SUBJECT, samples=10, noise="3s" if args.model_name else 0.35,
                        naive=args.job == "trace_naive", progress=False)
        extra = {"forwards": sum(r.n_forward for r in out.values()),
                 "scores": {k: r.scores.tolist() for k, r in out.items()}}
    elif args.job == "rome":
        record = rome_edit(lm, EditRequest(TEMPLATES[0], SUBJECT, " Rome"), ROMEHyperParams.for_model(lm), "identity",
                           progress=False)
        extra = {"layer": record.layer}
    else:
        hp = MemitHyperParams.for_model(lm, memory_mb=args.memory_mb, mom2_n_tokens=0)
        record = compute_memit(lm, requests(args.edits), hp, stats="identity", progress=False)
        extra = {"edits": len(record.requests), "layers": list(hp.layers)}
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    import resource

    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_bytes": peak, **extra}), flush=True)


def run_child(argv: list[str], timeout: float) -> dict:
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": (err.strip().splitlines() or ["failed"])[-1][:300]}
    result = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny models of the same families (a CPU check of the suite)")
    ap.add_argument("--edits", type=int, default=None, help="MEMIT batch (default 1000; --tiny 20)")
    ap.add_argument("--memory-mb", type=int, default=16384, help="MEMIT's z chunks are sized to this (default 16384)")
    ap.add_argument("--jobs", default=",".join(JOBS), help=f"comma list of {', '.join(JOBS)}")
    ap.add_argument("--budget", type=float, default=450, help="seconds for the whole suite (default 450)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", type=Path, default=None, help="also write the result record to this file")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--model-name", help=argparse.SUPPRESS)
    add_result_arguments(ap, "gpu_suite")
    args = ap.parse_args()
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.edits = args.edits or (20 if args.tiny else 1000)
    if args.job:
        return child(args)
    from tracer.files import write_json_atomic
    from tracer.plan import plan

    started, size = time.perf_counter(), "tiny" if args.tiny else "full"
    figures = {"device": args.device, "size": size, "edits": args.edits, "jobs": {}}
    gpt2_xl = None if args.tiny else real_gpt2_xl()
    with tempfile.TemporaryDirectory() as tmp:
        folders = {k: make_folder(k, size, Path(tmp), args.edits) for k in SHAPES}
        for job in args.jobs.split(","):
            kind = JOBS[job]
            dtype = "bfloat16" if kind == "llama-1b" and not args.tiny else "float32"
            real = gpt2_xl if kind == "gpt2-xl" else None
            p = plan(job.split("_")[0] if job.startswith("trace") else "edit" if job == "rome" else "memit",
                     real or str(folders[kind]), dtype=dtype, device=args.device, **job_sizes(job, args))
            left = args.budget - (time.perf_counter() - started)
            argv = ["--job", job, "--folder", str(folders[kind]), "--device", args.device, "--edits", str(args.edits),
                    "--memory-mb", str(args.memory_mb), "--threads", str(args.threads)]
            argv += ["--tiny"] if args.tiny else []
            argv += ["--model-name", real] if real else []
            got = run_child(argv, timeout=max(10.0, left)) if left > 10 else {"error": "no time left in the budget"}
            planned = p.per_device[p.device]  # the CPU's peak resident set includes the runtime; a GPU's does not
            row = {"model": real or f"{kind} shape, random weights", "dtype": dtype, "planned_device_bytes": planned,
                   "planned": p.to_dict(), **{k: v for k, v in got.items() if k != "scores"}}
            if got.get("peak_bytes"):
                row["peak_error"] = planned / got["peak_bytes"] - 1
            figures["jobs"][job] = row
            if "scores" in got:
                figures.setdefault("_scores", {})[job] = got["scores"]
            print(f"{job:14s} {row.get('seconds', float('nan')):8.1f} s  planned {planned / 2**20:9.0f} MiB  "
                  f"measured {(got.get('peak_bytes') or 0) / 2**20:9.0f} MiB  {got.get('error', '')}", flush=True)
    scores = figures.pop("_scores", {})
    if {"trace_batched", "trace_naive"} <= set(scores):
        import numpy as np

        figures["trace_max_abs_score_difference"] = max(
            float(np.nanmax(np.abs(np.array(scores["trace_batched"][k]) - np.array(scores["trace_naive"][k]))))
            for k in scores["trace_batched"])
        b, n = figures["jobs"]["trace_batched"], figures["jobs"]["trace_naive"]
        figures["trace_speedup"] = n["seconds"] / b["seconds"]
    figures["wall_s"] = time.perf_counter() - started
    print(f"suite: {figures['wall_s']:.0f} s", flush=True)
    if args.json:
        write_json_atomic(args.json, figures, indent=1)
    save_result(args, args.result_name, figures, threads=args.threads)


if __name__ == "__main__":
    main()
