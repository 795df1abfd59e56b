"""Typed settings and results of causal tracing: :class:`NoiseSpec` and :class:`TraceResult`."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import HyperParameterError
from .files import write_json_atomic

TraceKind = Literal["hidden", "mlp", "attn"]
KINDS: tuple[TraceKind, ...] = ("hidden", "mlp", "attn")
NoiseMode = Literal["rome", "torch"]


@dataclass(frozen=True)
class NoiseSpec:
    """How the subject's token embeddings are corrupted.

    ``scale`` is the absolute noise scale (already multiplied out when the user asked for
    ``"3s"``, i.e. three standard deviations; ``multiple`` then records the 3).
    ``mode="rome"`` draws ``numpy.random.RandomState(seed).randn(samples, n_subject, hidden)``
    (seed 1 is the original code's); ``mode="torch"`` draws from a seeded ``torch.Generator``.
    The same draw is used for every restoration of a trace.
    """

    scale: float
    mode: NoiseMode = "rome"
    distribution: Literal["gaussian", "uniform"] = "gaussian"
    replace: bool = False
    multiple: float | None = None

    def __post_init__(self):
        if not np.isfinite(self.scale) or self.scale < 0:
            raise HyperParameterError(f"noise scale must be a finite number >= 0, got {self.scale}")
        if self.mode not in ("rome", "torch"):
            raise HyperParameterError(f"noise mode must be 'rome' or 'torch', got {self.mode!r}")
        if self.distribution not in ("gaussian", "uniform"):
            raise HyperParameterError(f"noise distribution must be 'gaussian' or 'uniform', got {self.distribution!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NoiseSpec":
        return cls(**d)


def restored_layers(kind: str, layer: int, window: int, n_layers: int) -> tuple[int, ...]:
    """The layers restored for the heat-map cell at ``layer``: the block itself (``hidden``), or
    ROME's window of ``window`` MLP / attention layers around it, cut at the model's ends."""
    if kind == "hidden":
        return (layer,)
    return tuple(range(max(0, layer - window // 2), min(n_layers, layer + math.ceil(window / 2))))


@dataclass(frozen=True)
class TraceResult:
    """One causal trace of one prompt for one kind.

    ``scores[token, layer]`` is the mean (over noise samples) probability of the clean answer
    after restoring that site; ``low_score`` is the fully corrupted run, ``high_score`` the clean
    run; rows of tokens that were not traced (``tokens=`` of :func:`tracer.trace.trace_all`) are
    NaN. ``subject_span`` is ``[start, end)`` in token positions. ``severed`` names the module kind
    held at its corrupted value in all layers above the restored one (None for a plain trace).
    """

    prompt: str
    subject: str
    tokens: list[str]
    subject_span: tuple[int, int]
    kind: TraceKind
    window: int
    scores: np.ndarray  # "token layer"
    low_score: float
    high_score: float
    answer: str
    answer_id: int
    noise: NoiseSpec
    samples: int
    seed: int
    model: str
    severed: TraceKind | None = None
    n_forward: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.scores.shape[1])

    @property
    def indirect_effects(self) -> np.ndarray:
        """``scores - low_score``, shape ``[token, layer]``."""
        return self.scores - self.low_score

    @property
    def traced_tokens(self) -> list[int]:
        """Positions whose row was traced (not NaN)."""
        return [int(t) for t in np.flatnonzero(~np.isnan(self.scores).all(axis=1))]

    def strongest(self, k: int = 5) -> list[tuple[int, int, float]]:
        """The ``k`` (token, layer, score) traced cells with the highest score."""
        ranked = np.where(np.isnan(self.scores), -np.inf, self.scores)
        flat = np.argsort(ranked, axis=None)[::-1][:min(k, int((~np.isnan(self.scores)).sum()))]
        return [(int(t), int(l), float(self.scores[t, l])) for t, l in zip(*np.unravel_index(flat, self.scores.shape))]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scores"] = np.where(np.isnan(self.scores), None, self.scores).tolist()  # JSON has no NaN: null
        d["subject_span"] = list(self.subject_span)
        d["noise"] = self.noise.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TraceResult":
        d = dict(d)
        d["scores"] = np.asarray(d["scores"], dtype=np.float64)
        d["subject_span"] = tuple(d["subject_span"])
        d["noise"] = NoiseSpec.from_dict(d["noise"])
        return cls(**d)

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "TraceResult":
        return cls.from_dict(json.loads(Path(path).read_text()))


def suggest_layer(result: TraceResult) -> int:
    """Edit layer suggested by a trace: the layer whose restoration recovers most of the answer at
    the last subject token (ROME's choice; an ``mlp`` trace suggests best)."""
    if not isinstance(result, TraceResult):
        raise HyperParameterError(f"suggest_layer takes a TraceResult, got {type(result).__name__}")
    last = result.subject_span[1] - 1
    return int(result.scores[last].argmax())
