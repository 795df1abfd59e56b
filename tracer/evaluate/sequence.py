"""Sequential editing from a dataset with a guard: batch after batch, each on the model the earlier
ones edited, a health read-out after each, and the offending batch reverted when a reading crosses
a threshold the user set. Resumable: the kept batches are saved as a ledger after every batch.

    guard = Guard(max_norm_growth=1.10, max_perplexity_rise=0.10, max_entropy_drop=0.05, min_retention=0.8)
    result = run_sequence(lm, "alphaedit", cases, batch_size=100, out_dir="out/seq", guard=guard)
    result.breach        # None, or the batch that crossed a threshold (reverted, bit for bit)

Methods (:data:`SEQUENTIAL_METHODS`, from :data:`~tracer.evaluate.methods.METHODS`): ``rome`` (a
batch's cases one after another), ``memit``, ``alphaedit`` (its K_p: the batches kept so far).

Health after each batch (:class:`~tracer.edit.sequential.Health`): the Frobenius norm of each edited
matrix over the unedited one, perplexity on held-out Wikipedia text, the n-gram entropy of text
sampled from the first tokens of held-out articles (ROME's fluency measure,
:func:`~tracer.evaluate.text.mean_ngram_entropy`), the share of the batch's edits that hold (new
target more likely than the true one on the rewrite prompt: efficacy), and retention: of a seeded
sample of earlier edits that held when written, the share that still hold. The :class:`Guard`'s
thresholds are relative to the unedited model (norm, perplexity, entropy) or absolute (retention).

``out_dir`` holds ``run.json`` (the settings: a rerun with others is refused; the guard may
change), ``ledger.safetensors`` (the kept batches), ``health.json`` (one row per batch, and the
breach) and ``z/`` (MEMIT's z checkpoints). A rerun applies the ledger's batches (checked against
the first cases and the weights they were computed on) and continues after them.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from ..edit.ledger import Ledger
from ..edit.record_files import load_records, save_records
from ..edit.sequential import Health, heldout_texts, perplexity
from ..errors import FactscopeError, HyperParameterError
from ..files import write_json_atomic
from ..generation import sample
from ..layers import get_module
from ..models import LanguageModel, as_model
from .methods import make_method
from .metrics import case_scores, measure_probabilities
from .records import Case
from .text import mean_ngram_entropy

SEQUENTIAL_METHODS = ("rome", "memit", "alphaedit")


@dataclass(frozen=True)
class Guard:
    """Thresholds on the health read-out; None = not checked. Relative to the unedited model:
    ``max_norm_growth`` (‖W‖ / ‖W₀‖ of any edited matrix, e.g. 1.10), ``max_perplexity_rise``
    (perplexity / unedited − 1, e.g. 0.10 for +10 %), ``max_entropy_drop`` (1 − entropy / unedited);
    absolute: ``min_retention`` (share of sampled earlier edits that still hold, e.g. 0.8)."""

    max_norm_growth: float | None = None
    max_perplexity_rise: float | None = None
    max_entropy_drop: float | None = None
    min_retention: float | None = None

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None and not (isinstance(v, (int, float)) and v >= 0):
                raise HyperParameterError(f"guard threshold {f.name} must be a number >= 0 or None, got {v!r}")
        if self.min_retention is not None and self.min_retention > 1:
            raise HyperParameterError(f"min_retention is a share of edits in [0, 1], got {self.min_retention}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Guard":
        return cls(**d)

    def breaches(self, health: Health, unedited: Health) -> list[dict]:
        """``[{"reading", "value", "limit"}]`` for every threshold ``health`` crosses."""
        out = []

        def check(reading: str, value: float | None, limit: float | None, above: bool) -> None:
            if value is not None and limit is not None and (value > limit if above else value < limit):
                out.append({"reading": reading, "value": value, "limit": limit})

        worst = max(health.norm_ratio.items(), key=lambda kv: kv[1], default=(None, None))
        check(f"norm growth of {worst[0]}", worst[1], self.max_norm_growth, True)
        check("perplexity rise", health.perplexity / unedited.perplexity - 1, self.max_perplexity_rise, True)
        if health.entropy is not None and unedited.entropy:
            check("entropy drop", 1 - health.entropy / unedited.entropy, self.max_entropy_drop, True)
        check("retention", health.retention, self.min_retention, False)
        return out


@dataclass(frozen=True)
class SequenceResult:
    """What :func:`run_sequence` kept: the records of every kept batch (applied to the model, in
    order), the health rows (row 0: the unedited model), the breach (None if the run finished),
    and how many batches came from an earlier run's ledger."""

    records: tuple
    health: tuple[Health, ...]
    breach: dict | None
    resumed: int

    def to_dict(self) -> dict:
        return {"records": [r.id for r in self.records], "health": [h.to_dict() for h in self.health],
                "breach": self.breach, "resumed": self.resumed}


def holds(lm: LanguageModel, case: Case) -> bool:
    """Whether ``case``'s edit holds: efficacy on its rewrite prompt (the papers' ES for one case)."""
    scores = case_scores(measure_probabilities(lm, replace(case, paraphrase_prompts=(), neighborhood_prompts=(),
                                                           specificity_targets=())))
    return bool(scores.get("rewrite_success", scores.get("rewrite_acc", 0.0)) >= 1.0)


def _records_of(handle: Any) -> list:
    return list(handle.records) if isinstance(handle, Ledger) else [handle]


def _matches(record: Any, cases: Sequence[Case]) -> bool:
    """Whether ``record`` edits ``cases`` (subject and new target, in order)."""
    requests = [record.request] if hasattr(record, "request") else list(record.requests)
    return [(r.subject, r.target_new.strip()) for r in requests] == [(c.subject, c.target_new.strip()) for c in cases]


def run_sequence(model: "LanguageModel | str", method: str, cases: Sequence[Case], *, batch_size: int,
                 out_dir: str | os.PathLike, guard: Guard | None = None, method_options: dict | None = None,
                 texts: Sequence[str] | None = None, entropy_prompts: int = 8, entropy_length: int = 64,
                 retention_sample: int = 32, seed: int = 0, progress: bool = True,
                 checkpoint_dir: str | os.PathLike | None = None,
                 on_batch: Callable[[int, Sequence[Case], list, Health], None] | None = None) -> SequenceResult:
    """Edit ``cases`` in consecutive batches of ``batch_size`` with ``method`` (see the module
    docstring), reading health after each and stopping at the first batch that crosses a threshold
    of ``guard`` (that batch is reverted, bit for bit). The kept batches stay applied to the model.
    ``on_batch(b, cases, records, health)`` runs after every kept batch (e.g. to measure more).
    ``checkpoint_dir``: where MEMIT's and AlphaEdit's z are kept (default ``out_dir/z``; sequences
    of both methods may share one: z depend on the weights, not on the update rule)."""
    if method not in SEQUENTIAL_METHODS:
        raise HyperParameterError(f"sequential editing takes {', '.join(SEQUENTIAL_METHODS)}; got {method!r}")
    if batch_size < 1 or entropy_prompts < 0 or retention_sample < 0 or entropy_length < 2:
        raise HyperParameterError("batch_size must be >= 1, entropy_prompts and retention_sample >= 0, "
                                  "entropy_length >= 2")
    if not cases:
        raise HyperParameterError("no cases to edit")
    lm = as_model(model)
    guard = guard or Guard()
    editor = make_method(method, lm, progress=False, **(method_options or {}))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(editor, "checkpoint_dir"):
        editor.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out / "z"  # z survive interruptions
    texts = list(texts) if texts is not None else heldout_texts()
    prompts = [lm.tokenizer(t, add_special_tokens=True)["input_ids"][:8] for t in texts[:entropy_prompts]]
    settings = {"model": lm.name, "method": method, "method_settings": editor.settings(), "batch_size": batch_size,
                "cases": hashlib.sha256(json.dumps([c.to_dict() for c in cases], sort_keys=True).encode()).hexdigest()[:16],
                "n_cases": len(cases), "texts": hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16],
                "entropy_prompts": entropy_prompts, "entropy_length": entropy_length,
                "retention_sample": retention_sample, "seed": seed}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    run_file, health_file, ledger_file = out / "run.json", out / "health.json", out / "ledger.safetensors"
    if run_file.is_file() and json.loads(run_file.read_text()).get("key") != key:
        raise FactscopeError(f"{out} holds a sequence with other settings; resume with the same ones or pass a new "
                             "output directory")
    write_json_atomic(run_file, {"key": key, "settings": settings, "guard": guard.to_dict()}, indent=1, default=str)
    hp = editor.hp
    modules = [lm.layers.mlp_out_name(l) for l in ((hp.layer,) if hasattr(hp, "layer") else hp.layers)]
    norms0 = {m: float(get_module(lm.model, m).weight.double().norm()) for m in modules}
    batches = [list(cases[s:s + batch_size]) for s in range(0, len(cases), batch_size)]
    by_id = {c.case_id: c for c in cases}

    def read(b: int, n: int, seconds: float, efficacy: float | None, held_before: list[int]) -> Health:
        ratio = {m: float(get_module(lm.model, m).weight.double().norm()) / norms0[m] for m in modules}
        entropy = mean_ngram_entropy(sample(lm, prompts, max_length=entropy_length, top_k=5, seed=seed)) if prompts else None
        picked = random.Random(seed * 1_000_003 + b).sample(held_before, min(retention_sample, len(held_before)))
        retention = sum(holds(lm, by_id[i]) for i in picked) / len(picked) if picked else None
        return Health(batch=b, n_edits=n, norm_ratio=ratio, perplexity=perplexity(lm, texts), seconds=seconds,
                      entropy=entropy, efficacy=efficacy, retention=retention)

    rows = json.loads(health_file.read_text())["rows"] if health_file.is_file() else []
    kept: list[list] = []
    if ledger_file.is_file() and len(rows) > 1:  # resume: the ledger's batches, grouped as health.json lists them
        loaded = {r.id: r for r in load_records(ledger_file)}
        for b, row in enumerate(rows[1:], start=1):
            group = [loaded[i] for i in row.get("records", []) if i in loaded]
            if row.get("batch") != b or b > len(batches) or len(group) != len(row["records"]) \
                    or not _matches_all(group, batches[b - 1]):
                raise FactscopeError(f"{ledger_file} does not hold batch {b} of these cases as {health_file} lists it; "
                                     "pass a new output directory")
            kept.append(group)
        Ledger(lm).apply_all([r for g in kept for r in g])  # checks each against the weights it was made on
        if hasattr(editor, "adopt"):
            editor.adopt([r for g in kept for r in g])
    elif not rows:
        rows = [dict(read(0, 0, 0.0, None, []).to_dict(), records=[], held=[])]
    rows = rows[:len(kept) + 1]
    unedited = Health.from_dict(rows[0])
    resumed = len(kept)
    breach = None
    done = sum(len(b) for b in batches[:len(kept)])
    bar = tqdm(total=len(cases), initial=done, desc=f"sequential {method}", unit="edit", disable=not progress)
    try:
        for b in range(len(kept) + 1, len(batches) + 1):
            batch = batches[b - 1]
            t = time.perf_counter()
            handle = editor.apply(lm, batch)
            seconds = time.perf_counter() - t
            records = _records_of(handle)
            held = [c.case_id for c in batch if holds(lm, c)]
            earlier = [i for row in rows[1:] for i in row["held"]]
            health = read(b, done + len(batch), seconds, len(held) / len(batch), earlier)
            crossed = guard.breaches(health, unedited)
            if crossed:
                editor.revert(lm, handle)  # bit-exact: the weights of the batches kept before it
                breach = {"batch": b, "cases": [c.case_id for c in batch], "records": [r.id for r in records],
                          "crossed": crossed, "health": health.to_dict(), "reverted": True}
                write_json_atomic(health_file, {"rows": rows, "breach": breach}, indent=1)
                break
            kept.append(records)
            rows.append(dict(health.to_dict(), records=[r.id for r in records], held=held))
            save_records([r for g in kept for r in g], ledger_file)
            write_json_atomic(health_file, {"rows": rows, "breach": None}, indent=1)
            done += len(batch)
            bar.update(len(batch))
            bar.set_postfix_str(f"ppl {health.perplexity:.2f}, max norm {max(health.norm_ratio.values()):.3f}")
            if on_batch is not None:
                on_batch(b, batch, records, health)
    finally:
        bar.close()
    return SequenceResult(records=tuple(r for g in kept for r in g), health=tuple(Health.from_dict(r) for r in rows),
                          breach=breach, resumed=resumed)


def _matches_all(records: list, cases: Sequence[Case]) -> bool:
    """Whether ``records`` (one per case for ROME, one per batch otherwise) edit ``cases`` in order."""
    if len(records) == len(cases) and all(hasattr(r, "request") for r in records):
        return all(_matches(r, [c]) for r, c in zip(records, cases))
    return len(records) == 1 and _matches(records[0], cases)
