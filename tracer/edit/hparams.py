"""Settings of the editors, each a frozen dataclass checked on construction (``to_dict``/``from_dict``).

    ROMEHyperParams.for_model(lm)                 # the defaults for lm's identity (tracer.edit.defaults)
    MemitHyperParams.for_model(lm, mom2_weight=5000.0)
    AlphaEditHyperParams.for_model(lm, nullspace_threshold=2e-2)
    FTLHyperParams.for_model(lm, norm_constraint=2e-3)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal

from ..errors import HyperParameterError
from ..limits import COUNT_LIMITS
from ..models import LanguageModel, as_model
from .defaults import defaults_for
from .fields import is_int, is_number


@dataclass(frozen=True)
class ROMEHyperParams:
    """ROME's settings (defaults: the authors' GPT-2 XL file), overridable field by field.

    ``context_template_lengths`` lists ``(tokens, count)``: ``count`` templates of ``tokens``
    tokens (the start token included, as ROME counts). ``stats_tokens`` is the token count of
    the key statistics C that :func:`rome_edit` uses when it is not given statistics.
    """

    layer: int
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    kl_prompt: str = "{} is a"
    context_template_lengths: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    template_seed: int = 0
    template_starts: Literal["document", "words"] = "document"
    update: Literal["corrected", "original"] = "corrected"
    stats_tokens: int = 100_000
    stats_chunk_tokens: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "context_template_lengths", tuple(tuple(int(x) for x in p) for p in self.context_template_lengths))
        checks = [
            (isinstance(self.layer, int) and self.layer >= 0, "layer must be an integer >= 0"),
            (isinstance(self.v_num_grad_steps, int) and 1 <= self.v_num_grad_steps <= COUNT_LIMITS["steps"][1],
             f"v_num_grad_steps must be an integer in [1, {COUNT_LIMITS['steps'][1]}]"),
            (self.v_lr > 0, "v_lr must be > 0"),
            (self.v_weight_decay >= 0, "v_weight_decay must be >= 0"),
            (self.clamp_norm_factor > 0, "clamp_norm_factor must be > 0"),
            (self.kl_factor >= 0, "kl_factor must be >= 0"),
            (self.early_stop_loss >= 0, "early_stop_loss must be >= 0"),
            (self.kl_prompt.count("{}") == 1, "kl_prompt must contain '{}' exactly once"),
            (all(len(p) == 2 and p[0] >= 2 and p[1] >= 0 for p in self.context_template_lengths),
             "context_template_lengths must be (tokens >= 2, count >= 0) pairs"),
            (self.update in ("corrected", "original"), "update must be 'corrected' or 'original'"),
            (self.template_starts in ("document", "words"), "template_starts must be 'document' or 'words'"),
            (isinstance(self.stats_tokens, int) and self.stats_tokens >= 0, "stats_tokens must be an integer >= 0 (0 = C = I)"),
        ]
        for ok, message in checks:
            if not ok:
                raise HyperParameterError(f"{message}; got {self}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["context_template_lengths"] = [list(p) for p in self.context_template_lengths]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ROMEHyperParams":
        return cls(**d)

    @classmethod
    def for_model(cls, model: "LanguageModel | str", **overrides) -> "ROMEHyperParams":
        """The defaults for ``model``'s identity (:func:`~tracer.edit.defaults.defaults_for`), then ``overrides``."""
        lm = as_model(model)
        n = lm.n_layers
        hp = cls(**{**defaults_for(lm).rome, **overrides})
        if hp.layer >= n:
            raise HyperParameterError(f"layer {hp.layer} does not exist: {lm.name} has layers 0..{n - 1}")
        return hp


@dataclass(frozen=True)
class MemitHyperParams:
    """MEMIT settings (names follow the MEMIT code's ``MEMITHyperParams``).

    ``mom2_weight`` is λ; ``mom2_n_tokens`` the token count of C. ``chunk_requests`` fixes how
    many requests share one z-optimisation batch; ``None`` derives it from ``memory_mb``.
    """

    layers: tuple[int, ...]
    mom2_weight: float = 15000.0
    mom2_n_tokens: int = 100_000
    v_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    context_template_length: int = 10
    context_templates_per_start: int = 1
    chunk_requests: int | None = None
    memory_mb: int = 2048
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(l) for l in self.layers))
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise HyperParameterError(f"layers must be a non-empty increasing list of distinct layers, got {list(self.layers)}")
        for name in ("mom2_weight", "v_lr", "clamp_norm_factor"):
            if not getattr(self, name) > 0:
                raise HyperParameterError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.v_steps < 1 or self.memory_mb < 16 or (self.chunk_requests is not None and self.chunk_requests < 1):
            raise HyperParameterError("v_steps and chunk_requests must be >= 1 and memory_mb >= 16")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MemitHyperParams":
        """From :meth:`to_dict` (e.g. read from a file): every setting's type is checked first."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise HyperParameterError(f"unknown MEMIT settings {sorted(unknown)}; accepted: {sorted(names)}")
        for name, value in d.items():
            if name == "layers":
                ok = isinstance(value, (list, tuple)) and all(is_int(x) and x >= 0 for x in value)
                accepted = "a list of layer numbers"
            elif name == "chunk_requests":
                ok, accepted = value is None or is_int(value), "an integer or null"
            elif name in _INT_SETTINGS:
                ok, accepted = is_int(value), "an integer"
            else:
                ok, accepted = is_number(value), "a finite number"
            if not ok:
                raise HyperParameterError(f"MEMIT setting {name!r} must be {accepted}, got {value!r:.40}")
        return cls(**d)

    def rome_hparams(self) -> ROMEHyperParams:
        """The v* settings as :class:`ROMEHyperParams` at the last edited layer."""
        return ROMEHyperParams(layer=self.layers[-1], v_num_grad_steps=self.v_steps, v_lr=self.v_lr,
                               v_weight_decay=self.v_weight_decay, clamp_norm_factor=self.clamp_norm_factor,
                               kl_factor=self.kl_factor, early_stop_loss=self.early_stop_loss, stats_tokens=0)

    @classmethod
    def for_model(cls, model: "LanguageModel | str", **overrides) -> "MemitHyperParams":
        """The defaults for ``model``'s identity (:func:`~tracer.edit.defaults.defaults_for`), then ``overrides``."""
        return cls(**{**defaults_for(model).memit, **overrides})



@dataclass(frozen=True)
class AlphaEditHyperParams(MemitHyperParams):
    """AlphaEdit's settings (Fang et al. 2025): MEMIT's, plus the null-space projection.

    z, keys and layers are MEMIT's (the same fields, the same defaults for a model). The update
    differs: λC is replaced by the projection P onto the eigenvectors of C (C = E[k kᵀ], the mean
    over the corpus' tokens, as the authors' code reads it) that the threshold selects, and by
    ``l2`` · I (the authors' ``L2``); ``mom2_weight`` is not used. ``threshold_mode``:

    - ``"absolute"``: eigenvalues below ``nullspace_threshold`` (the authors' rule; their GPT-2 XL,
      GPT-J and Llama-3 files use 2e-2 and L2 = 10). It depends on the keys' scale.
    - ``"energy"``: the smallest eigenvalues whose sum stays within ``nullspace_threshold`` × the
      trace — the null space then carries at most that share of the preserved keys' E[‖k‖²],
      whatever the scale.
    - ``"relative"``: eigenvalues below ``nullspace_threshold`` × the largest one.
    """

    nullspace_threshold: float = 2e-2
    threshold_mode: Literal["absolute", "energy", "relative"] = "absolute"
    l2: float = 10.0

    def __post_init__(self):
        super().__post_init__()
        if not (self.nullspace_threshold > 0 and self.l2 > 0):
            raise HyperParameterError(f"nullspace_threshold and l2 must be > 0, got {self.nullspace_threshold} and {self.l2}")
        if self.threshold_mode not in ("absolute", "energy", "relative"):
            raise HyperParameterError(f"threshold_mode must be 'absolute', 'energy' or 'relative', got {self.threshold_mode!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "AlphaEditHyperParams":
        """From :meth:`to_dict`: every setting's type is checked first (``threshold_mode``: a string)."""
        mode = d.get("threshold_mode", "absolute")
        if not isinstance(mode, str):
            raise HyperParameterError(f"AlphaEdit setting 'threshold_mode' must be a string, got {mode!r:.40}")
        hp = super().from_dict({k: v for k, v in d.items() if k != "threshold_mode"})
        return cls(**{**hp.to_dict(), "threshold_mode": mode})


_INT_SETTINGS = {"mom2_n_tokens", "v_steps", "context_template_length", "context_templates_per_start", "memory_mb", "seed"}


@dataclass(frozen=True)
class FTLHyperParams:
    """FT+L settings (ROME's ``hparams/FT/gpt2-xl_constr.json``, at ROME's edit layer)."""

    layer: int
    steps: int = 25
    lr: float = 5e-4
    norm_constraint: float = 5e-4

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FTLHyperParams":
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in fields(cls)}})

    @classmethod
    def for_model(cls, model: "LanguageModel | str", **overrides) -> "FTLHyperParams":
        """The defaults for ``model``'s identity (:func:`~tracer.edit.defaults.defaults_for`: ROME's
        layer, ε and lr), then ``overrides``."""
        return cls(**{**defaults_for(model).ftl, **overrides})
