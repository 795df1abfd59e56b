"""What a report says first: findings computed from the results, in words and numbers.

    cells = strongest_cells(traces)              # {"mlp": Cell(token=" Tower", layer=5, ...), ...}
    outcome = edit_outcome(checks)               # rewrite / paraphrase / neighbour, before -> after
    verdict(outcome)                             # one line: did the edit take, generalise, stay specific?
    html = report_summary(traces, checks, new_target=" Rome", true_target=" Paris")

Pure functions of :mod:`tracer` results; the HTML escapes every datum (prompts, tokens and
answers are text, never markup). Used by :mod:`widgets.report` and the panels' pages.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from tracer.trace_result import TraceResult

from .figures import token_label

KIND_NAMES = {"hidden": "Hidden state (whole layer)", "mlp": "MLP", "attn": "Attention"}


@dataclass(frozen=True)
class Cell:
    """One (token, layer) cell of a trace: where restoring brings the answer back most."""

    kind: str
    token_index: int
    token: str
    where: str           # "last subject token", "last token", ...
    layer: int
    score: float         # p(answer) with this cell restored
    fraction: float      # share of the clean - corrupted gap restored


def token_role(result: TraceResult, index: int) -> str:
    """Where token ``index`` sits: first/last/middle subject token, first token after the
    subject, the last token, or a token before or after the subject."""
    start, end = result.subject_span
    last = len(result.tokens) - 1
    if start <= index < end:
        if end - start == 1:
            return "the subject's only token"
        return "first subject token" if index == start else "last subject token" if index == end - 1 else \
            "a middle subject token"
    if index == last:
        return "last token"
    if index == end:
        return "first token after the subject"
    return "a token before the subject" if index < start else "a later token"


def _cell(result: TraceResult, t: int, layer: int) -> Cell:
    gap = result.high_score - result.low_score
    score = float(result.scores[t, layer])
    return Cell(kind=result.kind, token_index=t, token=result.tokens[t], where=token_role(result, t), layer=layer,
                score=score, fraction=(score - result.low_score) / gap if gap else 0.0)


def strongest_cell(result: TraceResult, *, subject_only: bool = False) -> Cell | None:
    """The cell with the highest restored score (NaN cells skipped); ``subject_only``: among the
    subject's tokens. None when no cell was traced."""
    scores = np.where(np.isnan(result.scores), -np.inf, np.asarray(result.scores, dtype=float))
    if subject_only:
        start, end = result.subject_span
        mask = np.full(scores.shape, -np.inf)
        mask[start:end] = scores[start:end]
        scores = mask
    if not np.isfinite(scores).any():
        return None
    t, layer = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return _cell(result, int(t), int(layer))


def strongest_cells(traces: Mapping[str, TraceResult] | Sequence[TraceResult], *,
                    subject_only: bool = False) -> dict[str, Cell]:
    """:func:`strongest_cell` of each trace, by kind."""
    items = traces.values() if isinstance(traces, Mapping) else traces
    out = {}
    for r in items:
        cell = strongest_cell(r, subject_only=subject_only)
        if cell is not None:
            out[r.kind] = cell
    return out


# ----------------------------------------------------------------------------------------- edit
@dataclass(frozen=True)
class CheckGroup:
    """The checks of one kind (rewrite, paraphrase, neighbour): mean probabilities before and
    after the edit and how many succeeded (new preferred; for neighbours, true kept)."""

    kind: str
    n: int
    succeeded: int
    p_new_before: float
    p_new_after: float
    p_true_before: float
    p_true_after: float


def _success(check: Mapping) -> bool:
    if "success" in check and check["success"] is not None:
        return bool(check["success"])
    after = check["after"]
    prefers_new = float(after["p_new"]) > float(after.get("p_true") or 0.0)
    return not prefers_new if check.get("kind") == "neighbour" else prefers_new


def _mean(values) -> float:
    values = [float(v) for v in values if v is not None]
    return float(np.mean(values)) if values else float("nan")


def edit_outcome(checks: Sequence[Mapping]) -> dict[str, CheckGroup]:
    """Checks grouped by kind, in the order rewrite, paraphrase, neighbour, then others.
    ``checks``: ``EditCheck.to_dict()["prompts"]`` (or ``factscope edit --json``'s ``checks``)."""
    kinds: dict[str, list[Mapping]] = {}
    for i, c in enumerate(checks):
        kinds.setdefault(str(c.get("kind") or c.get("group") or ("rewrite" if i == 0 else "check")), []).append(c)
    order = sorted(kinds, key=lambda k: ({"rewrite": 0, "paraphrase": 1, "neighbour": 2}.get(k, 3), k))
    return {k: CheckGroup(kind=k, n=len(kinds[k]), succeeded=sum(_success(c) for c in kinds[k]),
                          p_new_before=_mean(c["before"]["p_new"] for c in kinds[k]),
                          p_new_after=_mean(c["after"]["p_new"] for c in kinds[k]),
                          p_true_before=_mean(c["before"].get("p_true") for c in kinds[k]),
                          p_true_after=_mean(c["after"].get("p_true") for c in kinds[k])) for k in order}


def verdict(outcome: Mapping[str, CheckGroup], new_target: str = "new", true_target: str = "true") -> str:
    """One line: whether the edit took on its prompt, carried to paraphrases, spared neighbours."""
    new, true = f"\u201c{new_target.strip()}\u201d", f"\u201c{true_target.strip()}\u201d"
    rewrite = outcome.get("rewrite")
    if rewrite is None:
        return "No edit was checked."
    if rewrite.succeeded < rewrite.n:
        return f"The edit did not take: after it the model still prefers {true} to {new} on the edited prompt."
    para, neigh = outcome.get("paraphrase"), outcome.get("neighbour")
    parts = [f"The edit took: the model now answers {new} instead of {true}"]
    if para is not None:
        parts.append("and carried over to every paraphrase" if para.succeeded == para.n else
                     f"but carried over to only {para.succeeded} of {para.n} paraphrases")
    if neigh is not None:
        parts.append("every neighbouring fact kept its answer" if neigh.succeeded == neigh.n else
                     f"but it also changed {neigh.n - neigh.succeeded} of {neigh.n} neighbouring facts (not specific)")
    return ", ".join(parts[:2]) + ("; " + parts[2] if len(parts) > 2 else "") + "."


# ----------------------------------------------------------------------------------------- html
def _tok(text: str) -> str:
    """A prompt or answer in a sentence: quoted, escaped."""
    return f"<q>{html.escape(text)}</q>"


def _cell_token(token: str) -> str:
    """A token as the heat maps' axes show it (a leading space as ␣), escaped, in quotes."""
    return f"\u201c{html.escape(token_label(token))}\u201d"


def cell_sentence(cell: Cell, answer: str) -> str:
    """``MLP: strongest at 'Tower' (last subject token), layer 5: p(Paris) 0.412, 61% of the gap.``"""
    return (f"<b>{html.escape(KIND_NAMES.get(cell.kind, cell.kind))}</b>: strongest at {_cell_token(cell.token)} "
            f"({html.escape(cell.where)}), <b>layer {cell.layer}</b>: p({html.escape(answer.strip())}) "
            f"<span class='fs-num'>{cell.score:.3f}</span>, {cell.fraction:.0%} of the gap restored")


def traces_summary(traces: Mapping[str, TraceResult] | Sequence[TraceResult], heading: str = "Where the fact is recalled") -> str:
    """Escaped HTML: the clean and corrupted probability, and per kind the strongest cell overall
    and within the subject."""
    items = list(traces.values()) if isinstance(traces, Mapping) else list(traces)
    if not items:
        return ""
    first = items[0]
    start, end = first.subject_span
    subject_tokens = "".join(first.tokens[start:end])
    lines = []
    overall, subject = strongest_cells(items), strongest_cells(items, subject_only=True)
    for r in items:
        if r.kind not in overall:
            continue
        line = cell_sentence(overall[r.kind], r.answer)
        sub = subject.get(r.kind)
        if sub is not None and sub.token_index != overall[r.kind].token_index:
            line += (f"; within the subject: {_cell_token(sub.token)} ({html.escape(sub.where)}), layer {sub.layer}, "
                     f"p <span class='fs-num'>{sub.score:.3f}</span> ({sub.fraction:.0%})")
        lines.append(f"<li class='fs-cell' data-kind='{html.escape(r.kind)}'>{line}.</li>")
    return (f"<h3>{html.escape(heading)}</h3><p>The model answers {_tok(first.answer)} to {_tok(first.prompt)} with "
            f"p = <span class='fs-num'>{first.high_score:.3f}</span>; with the subject {_tok(subject_tokens)} "
            f"blurred by noise it drops to <span class='fs-num'>{first.low_score:.3f}</span>. Restoring one cell "
            f"(a token at a layer) of the clean run brings it back most at:</p><ul>{''.join(lines)}</ul>")


def _pp(before: float, after: float) -> str:
    return f"<span class='fs-num'>{before:.3f} \u2192 {after:.3f}</span>"


def edit_summary(outcome: Mapping[str, CheckGroup], new_target: str, true_target: str) -> str:
    """Escaped HTML: per kind of check, P(new) and P(true) before -> after and how many succeeded."""
    new, true = html.escape(new_target.strip()), html.escape(true_target.strip())
    what = {"rewrite": "the edited prompt", "paraphrase": "paraphrases", "neighbour": "neighbouring facts"}
    goal = {"neighbour": "kept their answer"}
    lines = []
    for g in outcome.values():
        ok = f"{g.succeeded} of {g.n} {goal.get(g.kind, 'now prefer the new answer')}"
        lines.append(f"<li class='fs-check' data-kind='{html.escape(g.kind)}'><b>{html.escape(what.get(g.kind, g.kind))}"
                     f"</b>{' (mean)' if g.n > 1 else ''}: P(<span class='fs-new'>{new}</span>) "
                     f"{_pp(g.p_new_before, g.p_new_after)}, P(<span class='fs-true'>{true}</span>) "
                     f"{_pp(g.p_true_before, g.p_true_after)}; "
                     f"<span class='{'fs-ok' if g.succeeded == g.n else 'fs-bad'}'>{ok}</span>.</li>")
    return (f"<h3>What the edit did: <span class='fs-true'>{true}</span> \u2192 <span class='fs-new'>{new}</span></h3>"
            f"<ul>{''.join(lines)}</ul>")


def report_summary(traces: Mapping[str, TraceResult] | Sequence[TraceResult] = (), checks: Sequence[Mapping] = (), *,
                   new_target: str = "new", true_target: str = "true") -> str:
    """The summary block of the trace/edit report: verdict, where the fact is recalled, what the
    edit did. Escaped HTML."""
    outcome = edit_outcome(checks) if checks else {}
    parts = ["<h2>Summary</h2>"]
    if outcome:
        parts.append(f"<p class='fs-verdict'>{html.escape(verdict(outcome, new_target, true_target))}</p>")
    elif traces:
        cells = strongest_cells(traces, subject_only=True)
        best = cells.get("mlp") or next(iter(cells.values()), None)
        if best is not None:
            parts.append(f"<p class='fs-verdict'>Within the subject, restoring {html.escape(KIND_NAMES.get(best.kind, best.kind))} "
                         f"at {_cell_token(best.token)} ({html.escape(best.where)}), layer {best.layer}, "
                         f"brings back {best.fraction:.0%} of the answer's lost probability.</p>")
    parts.append(traces_summary(traces))
    if outcome:
        parts.append(edit_summary(outcome, new_target, true_target))
    return "".join(parts)
