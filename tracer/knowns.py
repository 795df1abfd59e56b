"""Known facts: the facts of a ``known_1000.json``-format file that a model answers correctly.

    facts = load_facts("../shared/data/known_1000.json")     # list of fact dicts
    known = filter_known(lm, facts)                          # KnownFacts (rule recorded)
    known.save("out/knowns.json"); KnownFacts.load("out/knowns.json").facts

The rule (:data:`RULE`): a fact is *known* when the model's greedy next token after ``prompt``
equals the first token of the attribute as it continues the prompt, i.e. the token at position
``len(encode(prompt))`` of ``encode(prompt + " " + attribute)`` (when the prompt's tokens are not
a prefix of that encoding, the first token of ``" " + attribute`` encoded alone). This is the
paper's "the model makes the correct prediction" test with a first-token criterion.

A facts file is either a JSON list of fact objects (ROME's ``known_1000.json``) or the object
written by :meth:`KnownFacts.save` (``{"filter": {...}, "facts": [...]}``); :func:`load_facts`
reads both. Each fact needs ``subject`` and ``prompt`` (or ``template`` with ``{}``) and, for
filtering, ``attribute``; ``known_id`` is used as the fact's id when present.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from .progress import tqdm

from .errors import DatasetError
from .files import write_json_atomic
from .limits import prompt_ids
from .models import LanguageModel, as_model
from .scoring import next_token_logprobs

log = logging.getLogger(__name__)

RULE = ("greedy first token after the prompt == first token of ' ' + attribute as it continues "
        "the prompt (token at position len(encode(prompt)) of encode(prompt + ' ' + attribute))")


def load_facts(path: str | Path) -> list[dict]:
    """Facts from a ``known_1000.json``-format list or a :meth:`KnownFacts.save` file.

    Every fact gets ``prompt`` (from ``template`` when missing) and ``known_id`` (its index when
    missing); :class:`DatasetError` names the first malformed record.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"facts file {str(path)!r} does not exist; pass a known_1000.json-format file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"facts file {str(path)!r} is not valid JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("facts"), list):
        data = data["facts"]
    if not isinstance(data, list):
        raise DatasetError(f"facts file {str(path)!r} must hold a JSON list of facts or an object with a 'facts' list")
    return normalize_facts(data, source=str(path))


def normalize_facts(records: list, source: str = "facts") -> list[dict]:
    """Check fact records and fill ``prompt`` and ``known_id``; ids must be unique."""
    facts, seen = [], set()
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DatasetError(f"{source}: record {i} is a {type(rec).__name__}, expected an object")
        rec = dict(rec)
        if not isinstance(rec.get("subject"), str) or not rec["subject"].strip():
            raise DatasetError(f"{source}: record {i} has no 'subject' string")
        if "prompt" not in rec:
            template = rec.get("template")
            if not isinstance(template, str) or "{}" not in template:
                raise DatasetError(f"{source}: record {i} has neither 'prompt' nor a 'template' containing '{{}}'")
            rec["prompt"] = template.replace("{}", rec["subject"], 1)
        if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
            raise DatasetError(f"{source}: record {i} has an empty 'prompt'")
        rec.setdefault("known_id", i)
        key = str(rec["known_id"])
        if key in seen:
            raise DatasetError(f"{source}: duplicate known_id {rec['known_id']!r} (record {i})")
        seen.add(key)
        facts.append(rec)
    return facts


@dataclass(frozen=True)
class KnownFacts:
    """The facts a model answers correctly, with the rule and counts that produced them.

    Each kept fact carries ``answer`` (the model's greedy token, decoded), ``answer_id``,
    ``answer_prob`` (its probability) and ``target_id`` (the attribute's first token).
    """

    model: str
    rule: str
    source: str
    source_md5: str
    n_checked: int
    facts: list[dict] = field(default_factory=list)

    @property
    def n_known(self) -> int:
        return len(self.facts)

    def to_dict(self) -> dict:
        return {"filter": {"model": self.model, "rule": self.rule, "source": self.source,
                           "source_md5": self.source_md5, "n_checked": self.n_checked, "n_known": self.n_known},
                "facts": list(self.facts)}

    @classmethod
    def from_dict(cls, d: dict) -> "KnownFacts":
        f = d["filter"]
        return cls(model=f["model"], rule=f["rule"], source=f["source"], source_md5=f["source_md5"],
                   n_checked=int(f["n_checked"]), facts=list(d["facts"]))

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: str | Path) -> "KnownFacts":
        return cls.from_dict(json.loads(Path(path).read_text()))


def target_token(lm: LanguageModel, prompt: str, attribute: str) -> int:
    """First token of ``attribute`` as it continues ``prompt`` (see :data:`RULE`)."""
    base = lm.encode(prompt)
    full = lm.encode(prompt + " " + attribute.strip())
    if len(full) > len(base) and full[: len(base)] == base:
        return int(full[len(base)])
    alone = lm.tokenizer(" " + attribute.strip(), add_special_tokens=False)["input_ids"]
    if not alone:
        raise DatasetError(f"attribute {attribute!r} encodes to no tokens")
    return int(alone[0])


@torch.no_grad()
def greedy_next(lm: LanguageModel, prompts: list[str], batch_size: int = 32,
                progress: bool = True) -> tuple[list[int], list[float]]:
    """The greedy next token and its probability for each prompt.

    Prompts are right-padded in batches; the logits are read at each prompt's own last token,
    so padding never reaches a real position (causal attention).
    """
    ids_out, probs_out = [], []
    for i, p in enumerate(prompts):  # all checked before any pass
        prompt_ids(lm, p, f"prompt {i}")
    bar = tqdm(total=len(prompts), desc="greedy answers", unit="fact", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        logp = next_token_logprobs(lm, chunk, batch_size=batch_size)  # "batch vocab"
        best = logp.max(dim=-1)
        ids_out += best.indices.tolist()
        probs_out += best.values.exp().tolist()
        bar.update(len(chunk))
    bar.close()
    return ids_out, probs_out


def filter_known(model: LanguageModel | str, facts: list[dict] | str | Path, *, batch_size: int = 32,
                 progress: bool = True) -> KnownFacts:
    """Keep the facts whose attribute's first token is the model's greedy answer (:data:`RULE`)."""
    lm = as_model(model)
    if isinstance(facts, (str, Path)):
        source = str(facts)
        loaded = load_facts(facts)  # checks the file first
        md5 = hashlib.md5(Path(facts).read_bytes()).hexdigest()
        facts = loaded
    else:
        facts = normalize_facts(facts)
        source = "<in memory>"
        md5 = hashlib.md5(json.dumps(facts, sort_keys=True).encode()).hexdigest()
    for i, fact in enumerate(facts):
        if not isinstance(fact.get("attribute"), str) or not fact["attribute"].strip():
            raise DatasetError(f"fact {fact['known_id']!r} (record {i}) has no 'attribute'; filtering needs the expected answer")
    answers, probs = greedy_next(lm, [f["prompt"] for f in facts], batch_size=batch_size, progress=progress)
    kept = []
    for fact, answer, prob in zip(facts, answers, probs):
        target = target_token(lm, fact["prompt"], fact["attribute"])
        if answer == target:
            kept.append({**fact, "answer": lm.decode(answer), "answer_id": int(answer),
                         "answer_prob": round(float(prob), 6), "target_id": target})
    log.info("%d of %d facts known by %s", len(kept), len(facts), lm.name)
    return KnownFacts(model=lm.name, rule=RULE, source=source, source_md5=md5, n_checked=len(facts), facts=kept)
