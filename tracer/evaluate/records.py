"""Evaluation records: CounterFact (full and reduced 10k) and zsRE, read into one typed shape.

    cases = load_cases("counterfact", limit=200)          # from $FACTSCOPE_DATA (or the data folder beside the checkout)
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
from ..errors import DatasetError, FactscopeError, HyperParameterError

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
        return self.prompt.replace("{}", self.subject, 1)

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
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path} is not a readable JSON file ({e}); pass a {dataset} JSON list of records") from None
    if not isinstance(raw, list):
        raise DatasetError(f"{path} holds a JSON {type(raw).__name__}, not a list of {dataset} records")
    raw = raw[:limit] if limit is not None else raw
    convert = {"counterfact": _counterfact, "counterfact-10k": _counterfact_10k, "zsre": _zsre}[dataset]
    cases = []
    for i, r in enumerate(raw):
        try:
            cases.append(convert(_Record(r), i))
        except _BadField as e:
            raise DatasetError(f"{path}: record {i} is not in the {dataset} format ({e}); "
                               "see tracer/evaluate/records.py") from None
    return cases


class _BadField(Exception):
    """A missing or mistyped field of one record (becomes a DatasetError naming file and record)."""


class _Record:
    """Typed access to one record's fields: ``r.text("requested_rewrite", "subject")``."""

    def __init__(self, raw: object):
        if not isinstance(raw, dict):
            raise _BadField(f"a JSON {type(raw).__name__}, not an object")
        self.raw = raw

    def _get(self, path: tuple[str, ...], default: object = ...) -> object:
        value = self.raw
        for key in path:
            if not isinstance(value, dict) or key not in value:
                if default is not ...:
                    return default
                raise _BadField(f"missing field {'.'.join(path)!r}")
            value = value[key]
        return value

    def text(self, *path: str, default: str | None = None) -> str:
        value = self._get(path, ... if default is None else default)
        if not isinstance(value, str):
            raise _BadField(f"field {'.'.join(path)!r} must be a string, got {type(value).__name__}")
        return value

    def texts(self, *path: str, optional: bool = False) -> tuple[str, ...]:
        value = self._get(path, () if optional else ...)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise _BadField(f"field {'.'.join(path)!r} must be a list of strings")
        return tuple(value)

    def integer(self, *path: str) -> int:
        value = self._get(path)
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).lstrip("-").isdigit():
            raise _BadField(f"field {'.'.join(path)!r} must be an integer, got {value!r:.40}")
        return int(value)


def _template(prompt: str, subject: str) -> str:
    """The rewrite template: ``prompt`` with ``{}`` for the subject."""
    if not subject.strip():
        raise _BadField("the subject is empty")
    if "{}" in prompt:
        return prompt
    if subject not in prompt:
        raise _BadField(f"subject {subject!r:.60} does not occur in prompt {prompt!r:.80}")
    return prompt.replace(subject, "{}", 1)


def _counterfact(r: _Record, _: int) -> Case:
    n = len(r.texts("neighborhood_prompts"))
    true = r.text("requested_rewrite", "target_true", "str")
    return Case(
        case_id=r.integer("case_id"), dataset="counterfact", subject=r.text("requested_rewrite", "subject"),
        prompt=_template(r.text("requested_rewrite", "prompt"), r.text("requested_rewrite", "subject")), target_new=r.text("requested_rewrite", "target_new", "str"),
        target_true=true, paraphrase_prompts=r.texts("paraphrase_prompts"),
        neighborhood_prompts=r.texts("neighborhood_prompts"), specificity_targets=(true,) * n,
        attribute_prompts=r.texts("attribute_prompts", optional=True),
        generation_prompts=r.texts("generation_prompts", optional=True),
        relation_id=r.text("requested_rewrite", "relation_id", default=""),
    )


def _counterfact_10k(r: _Record, _: int) -> Case:
    subject = r.text("subject")
    return Case(
        case_id=r.integer("case_id"), dataset="counterfact-10k", subject=subject,
        prompt=_template(r.text("prompt"), subject), target_new=r.text("target_new"),
        target_true=r.text("ground_truth"), paraphrase_prompts=(r.text("rephrase_prompt"),),
        neighborhood_prompts=(r.text("locality_prompt"),), specificity_targets=(r.text("locality_ground_truth"),),
    )


def _zsre(r: _Record, i: int) -> Case:
    subject, answers = r.text("subject"), r.texts("answers")
    if not answers:
        raise _BadField("field 'answers' is empty")
    return Case(
        case_id=i, dataset="zsre", subject=subject, prompt=_template(r.text("src"), subject),
        target_new=answers[0], paraphrase_prompts=(r.text("rephrase"),),
        neighborhood_prompts=(r.text("loc") + "?",), specificity_targets=(r.text("loc_ans"),),
    )
