"""Evaluation records: CounterFact (full and reduced 10k) and zsRE, read into one typed shape.

    cases = load_cases("counterfact", limit=200)          # $FACTSCOPE_DATA (or ../shared/data)/counterfact/...
    cases[0].rewrite_prompt      # "Ferrari F40, developed by"
    cases[0].target_new          # "Microsoft"

Every dataset becomes a list of :class:`Case`; the fields a dataset lacks are empty tuples, and
the metrics skip what is empty. The zsRE mapping is ROME/MEMIT's: the new target is
``answers[0]``, the rewrite prompt is the question ``src``, the paraphrase is ``rephrase`` and
the specificity prompt is ``loc + "?"`` with ``loc_ans`` as its answer (kept with its
``"nq question: "`` prefix, as ROME's ``MENDQADataset`` does).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

from ..datapaths import COUNTERFACT, COUNTERFACT_10K, ZSRE, data_file
from ..errors import FactscopeError, HyperParameterError

Dataset = Literal["counterfact", "counterfact-10k", "zsre"]
DATASETS: tuple[str, ...] = ("counterfact", "counterfact-10k", "zsre")
_FILES = {"counterfact": COUNTERFACT, "counterfact-10k": COUNTERFACT_10K, "zsre": ZSRE}


@dataclass(frozen=True)
class Case:
    """One edit request with its evaluation prompts.

    ``prompt`` is the rewrite template with ``{}`` for the subject; ``target_true`` is empty for
    zsRE (its metrics are accuracies of the new target only). ``specificity_targets`` holds the
    answer of each neighbourhood prompt (CounterFact: the edited fact's true object for every
    prompt; zsRE: the NQ answer).
    """

    case_id: int
    dataset: str
    subject: str
    prompt: str
    target_new: str
    target_true: str = ""
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    specificity_targets: tuple[str, ...] = ()
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    relation_id: str = ""

    @property
    def rewrite_prompt(self) -> str:
        return self.prompt.format(self.subject) if "{}" in self.prompt else self.prompt

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        names = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names})


def default_path(dataset: str, data_dir: str | Path | None = None) -> Path:
    """The file of ``dataset`` in ``data_dir``, else as :func:`tracer.datapaths.data_file` finds it
    (``$FACTSCOPE_DATA``, then the checked ``../shared/data`` next to the repo)."""
    check_dataset(dataset)
    return data_file(_FILES[dataset], folder=data_dir)


def check_dataset(dataset: str) -> None:
    if dataset not in _FILES:
        raise HyperParameterError(f"unknown dataset {dataset!r}; accepted: {', '.join(DATASETS)}")


def load_cases(dataset: str, path: str | Path | None = None, *, limit: int | None = None,
               data_dir: str | Path | None = None) -> list[Case]:
    """Read ``dataset`` from ``path`` (default: the shared copy) as :class:`Case` records."""
    check_dataset(dataset)
    if limit is not None and limit < 1:
        raise HyperParameterError(f"limit must be a positive number of records, got {limit}")
    path = Path(path) if path is not None else default_path(dataset, data_dir)
    if not path.is_file():
        raise FactscopeError(f"dataset file {path} does not exist; pass --data PATH to a {dataset} JSON file "
                             "(or set FACTSCOPE_DATA to a folder holding it)")
    raw = json.loads(path.read_text())
    raw = raw[:limit] if limit is not None else raw
    convert = {"counterfact": _counterfact, "counterfact-10k": _counterfact_10k, "zsre": _zsre}[dataset]
    try:
        return [convert(r, i) for i, r in enumerate(raw)]
    except (KeyError, TypeError) as e:
        raise FactscopeError(f"{path} is not in the {dataset} format (missing field {e}); see tracer/evaluate/records.py") from None


def _template(prompt: str, subject: str) -> str:
    if "{}" in prompt:
        return prompt
    if subject not in prompt:
        raise FactscopeError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    return prompt.replace(subject, "{}", 1)


def _counterfact(r: dict, _: int) -> Case:
    rw = r["requested_rewrite"]
    n = len(r["neighborhood_prompts"])
    return Case(
        case_id=int(r["case_id"]), dataset="counterfact", subject=rw["subject"], prompt=rw["prompt"],
        target_new=rw["target_new"]["str"], target_true=rw["target_true"]["str"],
        paraphrase_prompts=tuple(r["paraphrase_prompts"]), neighborhood_prompts=tuple(r["neighborhood_prompts"]),
        specificity_targets=(rw["target_true"]["str"],) * n, attribute_prompts=tuple(r.get("attribute_prompts", ())),
        generation_prompts=tuple(r.get("generation_prompts", ())), relation_id=rw.get("relation_id", ""),
    )


def _counterfact_10k(r: dict, _: int) -> Case:
    return Case(
        case_id=int(r["case_id"]), dataset="counterfact-10k", subject=r["subject"],
        prompt=_template(r["prompt"], r["subject"]), target_new=r["target_new"], target_true=r["ground_truth"],
        paraphrase_prompts=(r["rephrase_prompt"],), neighborhood_prompts=(r["locality_prompt"],),
        specificity_targets=(r["locality_ground_truth"],),
    )


def _zsre(r: dict, i: int) -> Case:
    return Case(
        case_id=i, dataset="zsre", subject=r["subject"], prompt=_template(r["src"], r["subject"]),
        target_new=r["answers"][0], paraphrase_prompts=(r["rephrase"],),
        neighborhood_prompts=(r["loc"] + "?",), specificity_targets=(r["loc_ans"],),
    )
