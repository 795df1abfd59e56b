"""Is the edit in? Before/after predictions on the rewrite prompt, paraphrases and neighbours.

    report = check_edit(lm, record, paraphrases=["The Eiffel Tower, the famous landmark, stands in"],
                        neighbours=["The Louvre is located in the city of"])
    report.efficacy, report.paraphrase_score, report.neighbourhood_score
    print(report.format())

``before`` is the model as given (without the record); ``after`` is the same model with the
record applied through :func:`~tracer.edit.ledger.edited` (restored afterwards). Success follows
the ROME paper: a rewrite or paraphrase prompt succeeds when the new target is more likely than
the true one (mean log-probability over each target's tokens, teacher forced by
:func:`tracer.scoring.score_targets`, as ``factscope evaluate`` scores them), a neighbour when the
true one stays more likely.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Sequence

from ..errors import EditError
from ..generation import greedy
from ..limits import Estimate, ModelShape, check_memory, forward_bytes, prompt_ids
from ..models import LanguageModel, as_model
from ..scoring import score_targets
from ..targets import target_ids
from .records import EditRecord
from .rome import edited

Kind = Literal["rewrite", "paraphrase", "neighbour", "check"]


@dataclass(frozen=True)
class Prediction:
    """Next-token view of one prompt: ``top`` k (token, probability), first-token probabilities of
    the new and true targets, and their mean log-probability over all target tokens."""

    top: tuple[tuple[str, float], ...]
    top1: str
    p_new: float
    p_true: float
    logp_new: float
    logp_true: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["top"] = [list(t) for t in self.top]
        return d


@dataclass(frozen=True)
class PromptCheck:
    prompt: str
    kind: Kind
    before: Prediction
    after: Prediction

    @property
    def success(self) -> bool:
        """New preferred after the edit (rewrite, paraphrase, check), true kept (neighbour)."""
        prefers_new = self.after.logp_new > self.after.logp_true
        return not prefers_new if self.kind == "neighbour" else prefers_new

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "kind": self.kind, "before": self.before.to_dict(), "after": self.after.to_dict(),
                "success": self.success}


@dataclass(frozen=True)
class Generation:
    prompt: str
    before: str
    after: str


@dataclass(frozen=True)
class EditCheck:
    """Result of :func:`check_edit`; the rewrite prompt comes first in ``prompts``."""

    record_id: str
    target_new: str
    target_true: str
    prompts: tuple[PromptCheck, ...]
    generations: tuple[Generation, ...]

    def _score(self, kind: str) -> float | None:
        rows = [p.success for p in self.prompts if p.kind == kind]
        return sum(rows) / len(rows) if rows else None

    @property
    def efficacy(self) -> float | None:
        return self._score("rewrite")

    @property
    def paraphrase_score(self) -> float | None:
        return self._score("paraphrase")

    @property
    def neighbourhood_score(self) -> float | None:
        return self._score("neighbour")

    def to_dict(self) -> dict:
        return {"record_id": self.record_id, "target_new": self.target_new, "target_true": self.target_true,
                "prompts": [p.to_dict() for p in self.prompts], "generations": [asdict(g) for g in self.generations],
                "efficacy": self.efficacy, "paraphrase_score": self.paraphrase_score,
                "neighbourhood_score": self.neighbourhood_score}

    def format(self) -> str:
        """A plain-text table: prompt, top-1 and p(new)/p(true) before and after."""
        lines = [f"new {self.target_new!r}  true {self.target_true!r}",
                 f"{'kind':<10} {'before':<28} {'after':<28} prompt"]
        for p in self.prompts:
            cells = [f"{b.top1!r} {b.p_new:.2f}/{b.p_true:.2f}" for b in (p.before, p.after)]
            lines.append(f"{p.kind:<10} {cells[0]:<28} {cells[1]:<28} {p.prompt}")
        for g in self.generations:
            lines += [f"generate   {g.prompt!r}", f"  before: {g.before!r}", f"  after:  {g.after!r}"]
        return "\n".join(lines)


def check_prompts(model: "LanguageModel | str", prompts: Sequence[str], target_new: str, target_true: str | None = None,
                  generation_prompts: Sequence[str] = (), max_new_tokens: int = 20,
                  labels: Sequence[str] | None = None) -> list[list[int]]:
    """Token ids of ``prompts`` after checking, before any forward pass, that each fits the model
    with the longer target appended (``target_true=None``: one token, the model's own top-1), that
    each generation prompt fits with ``max_new_tokens`` more, and that :func:`predict`'s one batch
    fits in memory. :class:`~tracer.errors.PromptError` / :class:`~tracer.limits.JobTooLargeError`
    name the prompt by ``labels[i]`` (default ``"check prompt i"``, from 1).
    """
    lm = as_model(model)
    longest = max(len(target_ids(lm.tokenizer, target_new)), len(target_ids(lm.tokenizer, target_true)) if target_true is not None else 1)
    labels = list(labels) if labels is not None else [f"check prompt {i + 1}" for i in range(len(prompts))]
    encoded = [prompt_ids(lm, p, labels[i], reserve=longest - 1, reserved_for="the target's tokens")
               for i, p in enumerate(prompts)]
    for i, p in enumerate(generation_prompts):
        prompt_ids(lm, p, f"generation prompt {i + 1}", reserve=max_new_tokens, reserved_for="the generated tokens")
    if encoded:
        width = max(len(e) for e in encoded) + longest - 1
        need = forward_bytes(ModelShape.of(lm), 2 * len(encoded), width, logit_positions=width)
        check_memory(Estimate("checking these prompts", need, (("forward pass", need),)), lm.device,
                     hint=f"pass fewer or shorter prompts ({len(encoded)} prompts, up to {width} tokens)")
    return encoded


def predict(model: "LanguageModel | str", prompts: Sequence[str], target_new: str, target_true: str,
            top_k: int = 5) -> list[Prediction]:
    """:class:`Prediction` s for ``prompts``, scored by :func:`tracer.scoring.score_targets` — the
    same teacher-forced probabilities ``factscope evaluate`` reports."""
    lm = as_model(model)
    check_prompts(lm, prompts, target_new, target_true)
    scores = score_targets(lm, [(p, t) for p in prompts for t in (target_new, target_true)], top_k=top_k)
    out = []
    for new, true in zip(scores[::2], scores[1::2]):
        out.append(Prediction(top=tuple((lm.decode(t), p) for t, p in new.top), top1=lm.decode(new.top[0][0]),
                              p_new=new.first_prob, p_true=true.first_prob, logp_new=-new.nll, logp_true=-true.nll))
    return out


def check_edit(model: "LanguageModel | str", record: EditRecord, paraphrases: Sequence[str] = (),
               neighbours: Sequence[str] = (), prompts: Sequence[str] = (), generation_prompts: Sequence[str] | None = None,
               top_k: int = 5, max_new_tokens: int = 20) -> EditCheck:
    """Before/after predictions for the rewrite prompt, ``paraphrases``, ``neighbours`` and other
    ``prompts`` (kind ``"check"``), and greedy generations from ``generation_prompts`` (default:
    two prompts about the subject; pass ``[]`` for none). ``model`` must not have ``record`` applied.
    """
    lm = as_model(model)
    if not isinstance(record, EditRecord):
        raise EditError(f"check_edit needs an EditRecord, got {type(record).__name__}")
    req = record.request
    subject = req.subject
    gens = list(generation_prompts) if generation_prompts is not None else [f"{subject} is", f"{subject} is famous for"]
    labelled = [(req.text, "rewrite")] + [(p, "paraphrase") for p in paraphrases] + \
        [(p, "neighbour") for p in neighbours] + [(p, "check") for p in prompts]
    texts = [p for p, _ in labelled]
    counts: dict[str, int] = {}
    names = []
    for _, kind in labelled:
        counts[kind] = counts.get(kind, 0) + 1
        names.append(f"the {kind} prompt" if kind == "rewrite" else f"{kind} prompt {counts[kind]}")
    check_prompts(lm, texts, req.target_new, record.target_true, gens, max_new_tokens, names)  # all, before any pass
    before = predict(lm, texts, req.target_new, record.target_true, top_k)
    gen_before = greedy(lm, gens, max_new_tokens) if gens else []
    with edited(lm, [record]):
        after = predict(lm, texts, req.target_new, record.target_true, top_k)
        gen_after = greedy(lm, gens, max_new_tokens) if gens else []
    return EditCheck(record_id=record.id, target_new=req.target_new, target_true=record.target_true,
                     prompts=tuple(PromptCheck(p, k, b, a) for (p, k), b, a in zip(labelled, before, after)),
                     generations=tuple(Generation(p, b, a) for p, b, a in zip(gens, gen_before, gen_after)))
