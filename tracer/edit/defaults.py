"""Default settings of ROME, MEMIT and FT-L, keyed by the model's identity, with their evidence.

    choice = defaults_for(lm)          # what applies to this model, and why
    choice.rome["layer"], choice.memit["layers"], choice.ftl["norm_constraint"]
    print(choice.describe())           # also: factscope defaults --model M

A model's identity is its architecture and dimensions (:class:`ModelIdentity`: the layer-map
family, depth, width, MLP width and vocabulary), read from the loaded model, never its name: the
embedded SmolLM2 loaded by alias, from its ``.gguf`` file or from a saved directory is the same
model and gets the same defaults. :data:`MEASURED` lists the models whose settings were measured
(by the papers' authors or by factscope, each with its evidence); any other model gets the
settings ``factscope calibrate`` derived from it (a settings file, :func:`calibration_path`), else
the rule of its family scaled to its depth (:func:`defaults_for` says which).

Settings file (written by :mod:`tracer.edit.calibrate`): JSON ``{"format": 1, "identity": {...},
"rome": {"layer"}, "memit": {"layers", "mom2_weight"}, "ftl": {"lr", "norm_constraint"},
"evidence": {...}, ...}``. The one under ``$FACTSCOPE_CACHE/calibration/<identity hash>.json``
applies to every model of that identity that no :data:`MEASURED` row matches; a file passed as
``settings=`` applies to its identity whatever the table says.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import HyperParameterError
from ..models import LanguageModel, as_model, cache_dir


@dataclass(frozen=True)
class ModelIdentity:
    """What a default depends on: the architecture (layer-map family) and the dimensions."""

    family: str
    n_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def of(cls, model: "LanguageModel | str") -> "ModelIdentity":
        lm = as_model(model)
        cfg = lm.model.config
        inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * lm.hidden_size
        vocab = int(lm.model.get_input_embeddings().weight.shape[0])
        return cls(lm.layers.family, lm.n_layers, lm.hidden_size, int(inter), vocab)

    def describe(self) -> str:
        return (f"{self.family}, {self.n_layers} layers, hidden {self.hidden_size}, MLP {self.intermediate_size}, "
                f"vocabulary {self.vocab_size}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelIdentity":
        return cls(**d)

    def key(self) -> str:
        """A short hash of the identity (the name of its calibration file)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Measured:
    """Settings measured on one model; they apply to every model with the same :class:`ModelIdentity`
    fields given in ``match`` (the others are free)."""

    model: str
    match: dict
    rome: dict = field(default_factory=dict)
    memit: dict = field(default_factory=dict)
    ftl: dict = field(default_factory=dict)
    evidence: dict = field(default_factory=dict)

    def matches(self, identity: ModelIdentity) -> bool:
        return all(getattr(identity, k) == v for k, v in self.match.items())


#: Measured settings, most specific first. Evidence: the paper or the factscope command and result
#: (``docs/defaults.md`` renders them with ``bench/results/*.json``).
MEASURED: tuple[Measured, ...] = (
    Measured("SmolLM2-135M (the embedded model)",
             {"family": "llama", "n_layers": 30, "hidden_size": 576, "intermediate_size": 1536, "vocab_size": 49152},
             rome={"layer": 4}, memit={"layers": (2, 3, 4, 5, 6), "mom2_weight": 1500.0},
             ftl={"lr": 1e-2, "norm_constraint": 1e-2},
             evidence={
                 "rome.layer": "peak of the MLP-window causal effect at the last subject token over the known facts "
                               "(bench/results/rome_layer_traces.json)",
                 "memit.layers": "the five layers around that peak, 2-6 (bench/results/memit_layer_traces.json)",
                 "memit.mom2_weight": "λ sweep on 20 held-out CounterFact records (1000-1019) in one batch: S 29.0 / "
                                      "53.3 / 86.1 / 88.8 / 89.3 / 89.1 for λ = 50,000 / 15,000 / 5,000 / 1,500 / 500 / "
                                      "150; 1,500 is the largest λ within one point of the best (bench/results/memit_lambda.json)",
                 "ftl.norm_constraint": "ε sweep on the same 20 records: 1e-2 is the largest of 5e-4 … 5e-2 that keeps the "
                                        "neighbourhood score within 10 points of the unedited model's "
                                        "(bench/results/ftl_epsilon.json)"}),
    Measured("Gemma 3 270M (the second embedded model)",
             {"family": "gemma3_text", "n_layers": 18, "hidden_size": 640, "vocab_size": 262144},
             rome={"layer": 4}, memit={"layers": (2, 3, 4, 5), "mom2_weight": 500.0},
             ftl={"lr": 1e-4, "norm_constraint": 1e-4},
             evidence={
                 "ftl.norm_constraint": "ε sweep on the same 20 held-out records, one at a time at layer 4: NS 76.5 / 73.0 / "
                                        "63.5 / 53.0 / 36.5 (unedited 79.0) for ε = lr = 5e-5 / 1e-4 / 2e-4 / 5e-4 / 1e-3; "
                                        "1e-4 is the largest that keeps NS within 10 points of the unedited model "
                                        "(bench/results/ftl_epsilon_gemma3.json)",
                 "memit.layers": "the scaling rule's 11 %-29 % of the depth, 2-5, around the ROME layer 4; MEMIT's "
                                 "residual shares are carried back through the post-feed-forward norm "
                                 "(tracer/edit/post_norm.py)",
                 "memit.mom2_weight": "λ sweep on 20 held-out CounterFact records (1000-1019) in one batch: S 32.3 / 55.7 / "
                                      "80.2 / 82.6 / 84.4 / 84.4 for λ = 50,000 / 15,000 / 5,000 / 1,500 / 500 / 150; 500 "
                                      "is the largest λ within one point of the best (bench/results/memit_lambda_gemma3.json)",
                 "rome.layer": "MLP-window causal traces of the first 20 known facts it answers (window 6, a third of "
                               "the depth as 10 is for SmolLM2): peak at layer 4 of 18, layers 2-6 inside its interval "
                               "(bench/results/known_facts_averages_gemma3_w6.json); single Eiffel→Rome edits wrote the "
                               "prompt and a paraphrase at layers 2 and 4, broke the Louvre neighbour at 3 and were weak "
                               "at 6."}),
    Measured("GPT-2 XL", {"family": "gpt2", "n_layers": 48, "hidden_size": 1600},
             rome={"layer": 17}, memit={"layers": (13, 14, 15, 16, 17), "mom2_weight": 20000.0},
             evidence={"rome.layer": "ROME paper / hparams/ROME/gpt2-xl.json",
                       "memit.layers": "MEMIT paper / hparams/MEMIT/gpt2-xl.json"}),
    Measured("GPT-2 large", {"family": "gpt2", "n_layers": 36, "hidden_size": 1280}, rome={"layer": 12},
             evidence={"rome.layer": "ROME's hparams/ROME/gpt2-large.json"}),
    Measured("GPT-2 medium", {"family": "gpt2", "n_layers": 24, "hidden_size": 1024}, rome={"layer": 8},
             evidence={"rome.layer": "ROME's hparams/ROME/gpt2-medium.json"}),
    Measured("GPT-J 6B", {"family": "gptj", "n_layers": 28, "hidden_size": 4096},
             rome={"layer": 5}, memit={"layers": (3, 4, 5, 6, 7, 8), "mom2_weight": 15000.0},
             evidence={"rome.layer": "ROME's hparams/ROME/EleutherAI_gpt-j-6B.json",
                       "memit.layers": "MEMIT paper / hparams/MEMIT/EleutherAI_gpt-j-6B.json"}),
    Measured("GPT-NeoX 20B", {"family": "gpt_neox", "n_layers": 44, "hidden_size": 6144}, rome={"layer": 15},
             evidence={"rome.layer": "ROME's hparams/ROME/EleutherAI_gpt-neox-20b.json"}),
)

#: For a model nobody measured: ROME's layer at the depth fraction of the family's measured model
#: (llama's for families without one); MEMIT's range 11 %-29 % of the stack (GPT-J's 3-8 of 28) with
#: GPT-J's λ; FT-L with ROME's GPT-2 XL settings.
FAMILY_FRACTION = {"gpt2": 17 / 48, "gptj": 5 / 28, "gpt_neox": 15 / 44, "llama": 4 / 30}
SCALED_MEMIT = {"lo": 0.11, "hi": 0.29, "mom2_weight": 15000.0}
BASE_FTL = {"lr": 5e-4, "norm_constraint": 5e-4}


@dataclass(frozen=True)
class Defaults:
    """The settings that apply to a model and why: ``source`` names the measured model matched (or
    the scaling rule), ``evidence`` says where each measured value comes from."""

    identity: ModelIdentity
    rome: dict
    memit: dict
    ftl: dict
    source: str
    evidence: dict

    def describe(self) -> str:
        lines = [f"model: {self.identity.describe()}", f"defaults: {self.source}",
                 f"  ROME  layer {self.rome['layer']}",
                 f"  MEMIT layers {list(self.memit['layers'])}, λ (mom2_weight) {self.memit['mom2_weight']:g}",
                 f"  FT-L  layer {self.ftl['layer']}, lr {self.ftl['lr']:g}, ε (norm_constraint) {self.ftl['norm_constraint']:g}"]
        lines += [f"  evidence for {k}: {v}" for k, v in self.evidence.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        memit = {**self.memit, "layers": list(self.memit["layers"])}
        return {"identity": self.identity.to_dict(), "rome": dict(self.rome), "memit": memit, "ftl": dict(self.ftl),
                "source": self.source, "evidence": dict(self.evidence)}

    @classmethod
    def from_dict(cls, d: dict) -> "Defaults":
        memit = {**d["memit"], "layers": tuple(d["memit"]["layers"])}
        return cls(ModelIdentity.from_dict(d["identity"]), dict(d["rome"]), memit, dict(d["ftl"]), d["source"],
                   dict(d["evidence"]))


#: version of the settings file :mod:`tracer.edit.calibrate` writes
SETTINGS_FORMAT = 1


def calibration_path(identity: ModelIdentity) -> Path:
    """Where ``factscope calibrate`` keeps a model's settings: ``$FACTSCOPE_CACHE/calibration/<identity key>.json``."""
    return cache_dir() / "calibration" / f"{identity.key()}.json"


def read_settings(path: "str | os.PathLike", identity: ModelIdentity | None = None) -> dict:
    """A settings file, checked: its format, its identity (equal to ``identity`` when given), an
    integer ROME layer, increasing MEMIT layers, positive λ, ε and lr. :class:`HyperParameterError`
    names the file and the field."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HyperParameterError(f"settings file {str(path)!r} is not readable JSON ({e}); write it with "
                                  "factscope calibrate") from None

    def bad(what: str) -> HyperParameterError:
        return HyperParameterError(f"settings file {str(path)!r}: {what}; write it again with factscope calibrate")

    if not isinstance(d, dict) or d.get("format") != SETTINGS_FORMAT:
        raise bad(f"format {d.get('format') if isinstance(d, dict) else None!r} is not {SETTINGS_FORMAT}")
    try:
        found = ModelIdentity.from_dict(d["identity"])
        layer = d["rome"]["layer"]
        layers, lam = d["memit"]["layers"], d["memit"]["mom2_weight"]
        lr, eps = d["ftl"]["lr"], d["ftl"]["norm_constraint"]
    except (KeyError, TypeError) as e:
        raise bad(f"missing or malformed field ({e})") from None
    if identity is not None and found != identity:
        raise bad(f"it is for another model ({found.describe()}), not this one ({identity.describe()})")
    if not (isinstance(layer, int) and 0 <= layer < found.n_layers):
        raise bad(f"rome.layer must be a layer of the model, got {layer!r}")
    if not (isinstance(layers, list) and layers and all(isinstance(x, int) and 0 <= x < found.n_layers for x in layers)
            and layers == sorted(set(layers))):
        raise bad(f"memit.layers must be increasing layers of the model, got {layers!r}")
    for name, v in (("memit.mom2_weight", lam), ("ftl.lr", lr), ("ftl.norm_constraint", eps)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
            raise bad(f"{name} must be a positive number, got {v!r}")
    return d


def defaults_for(model: "LanguageModel | str", settings: "str | os.PathLike | None" = None) -> Defaults:
    """The ROME / MEMIT / FT-L defaults for ``model``'s identity (see the module docstring);
    ``settings``: a settings file of ``factscope calibrate`` to use whatever the table says."""
    identity = ModelIdentity.of(model)
    measured = next((m for m in MEASURED if m.matches(identity)), None)
    cached = calibration_path(identity)
    if settings is None and measured is None and cached.is_file():
        settings = cached
    base = table_defaults(identity, measured)
    if settings is None:
        if measured is not None and cached.is_file():
            return Defaults(base.identity, base.rome, base.memit, base.ftl,
                            base.source + f"; the calibration in {cached} is not used (measured settings take "
                            "precedence; pass it as settings= to use it)", base.evidence)
        return base
    d = read_settings(settings, identity)
    rome = {**base.rome, "layer": d["rome"]["layer"]}
    memit = {**base.memit, "layers": tuple(d["memit"]["layers"]), "mom2_weight": float(d["memit"]["mom2_weight"])}
    ftl = {**base.ftl, "lr": float(d["ftl"]["lr"]), "norm_constraint": float(d["ftl"]["norm_constraint"]),
           "layer": rome["layer"]}
    evidence = {k: str(v) for k, v in (d.get("evidence") or {}).items()}
    source = (f"calibrated from the model itself by factscope calibrate ({Path(settings)}, {d.get('date', 'date not recorded')}): "
              "ROME layer, MEMIT layers and λ, FT-L ε and lr; other settings by the "
              + ("measured model's table" if measured is not None else "scaling rule"))
    return Defaults(identity, rome, memit, ftl, source, evidence)


def table_defaults(identity: ModelIdentity, measured: "Measured | None") -> Defaults:
    """The table's defaults: the measured row matched, else the family's rule scaled to the depth."""
    n = identity.n_layers
    fraction = FAMILY_FRACTION.get(identity.family, FAMILY_FRACTION["llama"])
    rome: dict[str, Any] = {"layer": min(n - 1, max(0, round(fraction * n)))}
    lo = max(0, round(SCALED_MEMIT["lo"] * n))
    hi = max(lo, min(n - 2, round(SCALED_MEMIT["hi"] * n)))
    memit: dict[str, Any] = {"layers": tuple(range(lo, hi + 1)), "mom2_weight": SCALED_MEMIT["mom2_weight"]}
    ftl: dict[str, Any] = dict(BASE_FTL)
    if measured is None:
        source = (f"no measured model has this identity: ROME's layer at {fraction:.3f} of the depth "
                  f"({identity.family if identity.family in FAMILY_FRACTION else 'llama'} rule), MEMIT layers "
                  f"{SCALED_MEMIT['lo']:.0%}-{SCALED_MEMIT['hi']:.0%} of the depth with GPT-J's λ, FT-L with ROME's "
                  "GPT-2 XL settings (factscope defaults lists the measured models)")
        evidence: dict = {}
    else:
        rome.update(measured.rome)
        memit.update(measured.memit)
        ftl.update(measured.ftl)
        given = [k for k, d in (("ROME", measured.rome), ("MEMIT", measured.memit), ("FT-L", measured.ftl)) if d]
        source = (f"measured on {measured.model} ({', '.join(given)}; matched on "
                  f"{', '.join(f'{k} {v}' for k, v in measured.match.items())}); other settings by the scaling rule")
        evidence = dict(measured.evidence)
    ftl["layer"] = rome["layer"]
    return Defaults(identity, rome, memit, ftl, source, evidence)
