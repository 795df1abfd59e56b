"""Default settings of ROME, MEMIT and FT-L, keyed by the model's identity, with their evidence.

    choice = defaults_for(lm)          # what applies to this model, and why
    choice.rome["layer"], choice.memit["layers"], choice.ftl["norm_constraint"]
    print(choice.describe())           # also: factscope defaults --model M

A model's identity is its architecture and dimensions (:class:`ModelIdentity`: the layer-map
family, depth, width, MLP width and vocabulary), read from the loaded model, never its name: the
embedded SmolLM2 loaded by alias, from its ``.gguf`` file or from a saved directory is the same
model and gets the same defaults. :data:`MEASURED` lists the models whose settings were measured
(by the papers' authors or by factscope, each with its evidence); any other model gets the rule of
its family scaled to its depth (:func:`defaults_for` says which).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..models import LanguageModel, as_model


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
             rome={"layer": 4},
             evidence={
                 "rome.layer": "MLP-window causal traces of the first 20 known facts it answers (window 6, a third of "
                               "the depth as 10 is for SmolLM2): peak at layer 4 of 18, layers 2-6 inside its interval "
                               "(bench/results/known_facts_averages_gemma3_w6.json); single Eiffel→Rome edits wrote the "
                               "prompt and a paraphrase at layers 2 and 4, broke the Louvre neighbour at 3 and were weak "
                               "at 6. MEMIT is refused on this family (post-feed-forward norm); FT-L keeps ROME's ε."}),
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


def defaults_for(model: "LanguageModel | str") -> Defaults:
    """The ROME / MEMIT / FT-L defaults for ``model``'s identity (see the module docstring)."""
    identity = ModelIdentity.of(model)
    n = identity.n_layers
    measured = next((m for m in MEASURED if m.matches(identity)), None)
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
