"""Defaults for a model nobody measured, derived from the model itself (``factscope calibrate``).

    cal = calibrate(lm, n_facts=20, samples=5)    # traces, keys and weights: minutes on a CPU
    cal.save()                                     # $FACTSCOPE_CACHE/calibration/<identity key>.json
    defaults_for(lm).source                        # "calibrated from the model itself ..." (unmeasured models)

Three measurements, each kept with its numbers in the settings file (:class:`Calibration`):

- **Edit layers.** MLP causal traces (window ``window``, noise ``3s``) at the last subject token
  of ``n_facts`` facts of ``known_1000.json`` the model answers correctly (drawn with ``seed``).
  ROME's layer is the peak of the mean indirect effect; a percentile bootstrap over facts gives
  each layer's interval and how often each layer is the peak. MEMIT's layers are the contiguous
  run around the peak whose mean is at least ``plateau`` (80 %) of the peak, and one layer past
  it, as MEMIT's GPT-J range (3–8) runs past ROME's layer 5.
- **λ.** MEMIT solves ΔW = R Kᵀ (λC + K Kᵀ)⁻¹; by Woodbury it writes the fraction G (λ + G)⁻¹ of
  the residuals along the batch's keys, G = Kᵀ C⁻¹ K. λ is the value at which a typical batch
  (the keys of ``batch`` known facts at each MEMIT layer, MEMIT's context templates) is written
  to the mean fraction ``write`` over G's eigenvalues; the median over the MEMIT layers, to two
  significant digits. ``write`` = 2/3 is the embedded model's λ sweep expressed in this
  scale-free unit (docs/defaults.md): the one constant carried from one model to the next.
- **ε.** FT-L keeps each weight within ±ε of W₀, so for a key k no output coordinate moves by
  more than ε‖k‖₁. ε makes that bound the typical size of an output coordinate:
  ε = RMS((W₀k)ᵢ) / mean ‖k‖₁ over ``corpus_tokens`` corpus keys at ROME's layer (the first token
  of each chunk, an attention sink, left out), two significant digits; FT-L's lr = ε.
"""
from __future__ import annotations

import datetime as _dt
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..datapaths import KNOWNS, data_file
from ..errors import DatasetError, HyperParameterError
from ..files import write_json_atomic
from ..hooks import run_until
from ..knowns import filter_known, load_facts
from ..layers import get_module
from ..limits import check_count, check_seed
from ..models import LanguageModel, as_model
from ..stats import Corpus
from ..trace import trace
from ..trace_result import TraceResult
from .defaults import SETTINGS_FORMAT, ModelIdentity, calibration_path, read_settings
from .hparams import MemitHyperParams
from .keys import key_rows
from .memit import keys_and_z
from .statistics import statistics_at
from .templates import context_templates

#: the mean write fraction G (λ + G)⁻¹ that λ is set to (see the module docstring)
WRITE_FRACTION = 2 / 3


@dataclass(frozen=True)
class Calibration:
    """Settings derived from one model, their evidence (sentences) and the numbers behind them."""

    identity: ModelIdentity
    model: str
    rome: dict
    memit: dict
    ftl: dict
    evidence: dict
    measurements: dict
    seconds: dict
    settings: dict
    date: str = field(default_factory=lambda: _dt.datetime.now().astimezone().isoformat(timespec="seconds"))

    def to_dict(self) -> dict:
        return {"format": SETTINGS_FORMAT, "identity": self.identity.to_dict(), "model": self.model, "date": self.date,
                "rome": dict(self.rome), "memit": {**self.memit, "layers": list(self.memit["layers"])},
                "ftl": dict(self.ftl), "evidence": dict(self.evidence), "measurements": self.measurements,
                "seconds": dict(self.seconds), "settings": dict(self.settings)}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(ModelIdentity.from_dict(d["identity"]), d["model"], dict(d["rome"]),
                   {**d["memit"], "layers": tuple(d["memit"]["layers"])}, dict(d["ftl"]), dict(d["evidence"]),
                   d["measurements"], dict(d["seconds"]), dict(d["settings"]), d["date"])

    def save(self, path: "str | os.PathLike | None" = None) -> Path:
        """Write the settings file (default: :func:`~tracer.edit.defaults.calibration_path`); returns its path."""
        target = Path(path) if path is not None else calibration_path(self.identity)
        write_json_atomic(target, self.to_dict(), indent=1)
        return target

    @classmethod
    def load(cls, path: "str | os.PathLike") -> "Calibration":
        return cls.from_dict(read_settings(path))

    def describe(self) -> str:
        m = self.measurements
        lines = [f"model: {self.model} ({self.identity.describe()})",
                 f"  ROME  layer {self.rome['layer']}",
                 f"  MEMIT layers {list(self.memit['layers'])}, λ (mom2_weight) {self.memit['mom2_weight']:g}",
                 f"  FT-L  ε (norm_constraint) = lr = {self.ftl['norm_constraint']:g}"]
        lines += [f"  evidence for {k}: {v}" for k, v in self.evidence.items()]
        layers = m["layers"]
        lines.append("  MLP indirect effect at the last subject token, mean [95 % interval], share of resamples peaking there:")
        lines += [f"    L{i:<3d} {mu:+.4f} [{lo:+.4f}, {hi:+.4f}] {share:5.1%}"
                  for i, (mu, lo, hi, share) in enumerate(zip(layers["mean"], layers["ci_low"], layers["ci_high"],
                                                               layers["peak_share"]))]
        lines.append("  time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        return "\n".join(lines)


@dataclass(frozen=True)
class _Fact:
    prompt: str   # with {} for the subject (what key_rows reads)
    subject: str


def last_subject_effects(lm: LanguageModel, prompt: str, subject: str, *, samples: int = 10, window: int = 10,
                         noise: Any = "3s", seed: int = 1) -> tuple[np.ndarray, TraceResult]:
    """The MLP-window indirect effect at the last subject token, per layer (``score - low_score``),
    and the trace it comes from (only that token's row is traced)."""
    t = trace(lm, prompt, subject, kind="mlp", tokens="last_subject", samples=samples, window=window, noise=noise,
              seed=seed, progress=False)
    return t.indirect_effects[t.subject_span[1] - 1], t


def known_facts(lm: LanguageModel, n: int, *, path: "str | os.PathLike | None" = None, seed: int = 0,
                chunk: int = 100) -> list[dict]:
    """``n`` facts of ``path`` (default ``known_1000.json``) the model answers correctly, in a seeded
    random order; the facts are checked in chunks until ``n`` are found."""
    facts = load_facts(path if path is not None else data_file(KNOWNS))
    order = np.random.default_rng(check_seed(seed)).permutation(len(facts))
    kept: list[dict] = []
    for start in range(0, len(facts), chunk):
        kept += filter_known(lm, [facts[i] for i in order[start:start + chunk]], progress=False).facts
        if len(kept) >= n:
            return kept[:n]
    raise DatasetError(f"{lm.name} answers only {len(kept)} of the {len(facts)} facts correctly; calibration needs {n} "
                       "(lower n_facts or batch, or pass a facts file the model knows)")


def layer_evidence(effects: np.ndarray, *, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Mean, percentile-bootstrap interval and peak share per layer of ``effects`` ("fact layer")."""
    rng = np.random.default_rng(seed)
    n = effects.shape[0]
    boot = effects[rng.integers(0, n, size=(n_boot, n))].mean(1)  # "resample layer"
    alpha = (1 - confidence) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha], axis=0)
    peaks = boot.argmax(1)
    mean = effects.mean(0)
    return {"n_facts": int(n), "n_boot": int(n_boot), "confidence": confidence, "mean": mean.tolist(),
            "ci_low": low.tolist(), "ci_high": high.tolist(),
            "peak_share": (np.bincount(peaks, minlength=effects.shape[1]) / n_boot).tolist(),
            "peak": int(mean.argmax()), "peak_interval": [int(np.quantile(peaks, alpha, method="lower")),
                                                           int(np.quantile(peaks, 1 - alpha, method="higher"))]}


def memit_range(mean: Sequence[float], peak: int, plateau: float = 0.8) -> tuple[int, ...]:
    """The contiguous layers around ``peak`` with ``mean >= plateau · mean[peak]``, and one more above
    (at most the second-to-last layer)."""
    top = mean[peak] * plateau
    lo, hi = peak, peak
    while lo > 0 and mean[lo - 1] >= top:
        lo -= 1
    while hi < len(mean) - 1 and mean[hi + 1] >= top:
        hi += 1
    return tuple(range(lo, max(hi, min(hi + 1, len(mean) - 2)) + 1))


def lambda_for(gram_eigenvalues: torch.Tensor, write: float = WRITE_FRACTION) -> float:
    """The λ at which mean(g / (λ + g)) over the eigenvalues g of G = Kᵀ C⁻¹ K equals ``write``."""
    g = gram_eigenvalues.double().clamp(min=0)
    if not 0 < write < 1 or float(g.max()) <= 0:
        raise HyperParameterError(f"write must lie in (0, 1) and the keys must not vanish; got write={write}")
    lo, hi = float(g.max()) * 1e-9, float(g.max()) * 1e9
    for _ in range(200):  # the fraction falls as λ grows: bisection on log λ
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if float((g / (mid + g)).mean()) > write else (lo, mid)
    return (lo * hi) ** 0.5


def epsilon_for(lm: LanguageModel, layer: int, corpus_tokens: int = 4096, chunk: int = 128) -> dict:
    """FT-L's ε at ``layer``: RMS((W₀k)ᵢ) / mean ‖k‖₁ over ``corpus_tokens`` corpus keys (see the module docstring)."""
    name = lm.layers.mlp_out_name(layer)
    weight = get_module(lm.model, name).weight.detach().float()
    w = weight if lm.layers.mlp_out_transposed else weight.T  # "d_k out"
    keys: list[torch.Tensor] = []
    seen = 0
    with torch.no_grad():
        for text in Corpus.from_source(None).texts():
            ids = lm.tokenizer(text, add_special_tokens=True)["input_ids"]
            for s in range(0, len(ids) - 1, chunk):
                piece = ids[s:s + chunk]
                run_until(lm.model, lambda: lm.model(input_ids=torch.tensor([piece], device=lm.device), use_cache=False),
                          lm.layers.block_name(layer), inputs={name: lambda x: keys.append(x[0, 1:].float())})
                seen += len(piece) - 1
                if seen >= corpus_tokens:
                    break
            if seen >= corpus_tokens:
                break
    k = torch.cat(keys)[:corpus_tokens]  # "token d_k"
    rms_out = float((k @ w.to(k.device)).pow(2).mean().sqrt())
    l1 = float(k.abs().sum(1).mean())
    return {"layer": layer, "tokens": int(k.shape[0]), "rms_output": rms_out, "mean_key_l1": l1,
            "weight_std": float(weight.std()), "epsilon": rms_out / l1}


def _two_digits(x: float) -> float:
    return float(f"{x:.2g}")


def check_settings(*, n_facts: int, samples: int, batch: int, plateau: float = 0.8, write: float = WRITE_FRACTION,
                   seed: int = 0) -> None:
    """:class:`HyperParameterError` for a setting :func:`calibrate` cannot use (called before any model loads)."""
    for name, value in (("n_facts", n_facts), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise HyperParameterError(f"{name} must be an integer >= 2, got {value!r}")
    check_count("samples", samples)
    check_seed(seed)
    if not 0 < plateau <= 1 or not 0 < write < 1:
        raise HyperParameterError(f"plateau must lie in (0, 1] and write in (0, 1); got {plateau} and {write}")


def calibrate(model: "LanguageModel | str", *, n_facts: int = 20, samples: int = 5, window: int = 10, batch: int = 20,
              stats: Any = None, stats_tokens: int = 100_000, facts_path: "str | os.PathLike | None" = None,
              plateau: float = 0.8, write: float = WRITE_FRACTION, corpus_tokens: int = 4096, n_boot: int = 1000,
              seed: int = 0, progress: bool = True) -> Calibration:
    """Derive ROME's layer, MEMIT's layers and λ, and FT-L's ε from ``model`` (see the module docstring).

    ``stats``: where C comes from (as for MEMIT: None = the cache, ``"identity"``, a StatsCache);
    ``stats_tokens``: its token count (MEMIT's default, so the edits reuse the cached C).
    """
    check_settings(n_facts=n_facts, samples=samples, batch=batch, plateau=plateau, write=write, seed=seed)
    lm = as_model(model)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    facts = known_facts(lm, max(n_facts, batch), path=facts_path, seed=seed)
    seconds["known facts"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rows = []
    for f in tqdm(facts[:n_facts], desc="calibrate: MLP traces", unit="fact", disable=not progress):
        rows.append(last_subject_effects(lm, f["prompt"], f["subject"], samples=samples, window=window, seed=seed + 1)[0])
    effects = np.stack(rows)
    layers = layer_evidence(effects, n_boot=n_boot, seed=seed)
    rome_layer = layers["peak"]
    memit_layers = memit_range(layers["mean"], rome_layer, plateau)
    seconds["traces"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    hp = MemitHyperParams(layers=memit_layers, mom2_n_tokens=stats_tokens, seed=seed)
    templates = context_templates(lm, hp)
    key_facts = [_Fact(f["prompt"].replace(f["subject"], "{}", 1), f["subject"]) for f in facts[:batch]]
    key_rows_ = key_rows(lm, key_facts, templates)
    per_layer = {}
    for layer in tqdm(memit_layers, desc="calibrate: keys and C", unit="layer", disable=not progress):
        keys, _ = keys_and_z(lm, key_rows_, layer, layer, 256)
        ks = statistics_at(lm, layer, stats, stats_tokens, progress=progress)
        k = keys.double().cpu()
        gram = k @ ks.solve(k).T  # "fact fact" = Kᵀ C⁻¹ K
        eig = torch.linalg.eigvalsh((gram + gram.T) / 2)
        per_layer[layer] = {"lambda": lambda_for(eig, write), "mahalanobis_median": float(torch.diagonal(gram).median()),
                            "eigenvalues": eig.tolist(), "statistics": ks.label}
    lam = _two_digits(float(np.median([v["lambda"] for v in per_layer.values()])))
    seconds["keys and λ"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    eps = epsilon_for(lm, rome_layer, corpus_tokens)
    epsilon = _two_digits(eps["epsilon"])
    seconds["ε"] = time.perf_counter() - t0

    lo_ci, hi_ci = layers["peak_interval"]
    evidence = {
        "rome.layer": f"peak of the mean MLP indirect effect at the last subject token over {n_facts} known facts "
                      f"({samples} noise samples, window {window}): layer {rome_layer} "
                      f"({layers['peak_share'][rome_layer]:.0%} of {n_boot} bootstrap resamples peak there; 95 % "
                      f"interval of the peak layer {lo_ci}-{hi_ci})",
        "memit.layers": f"layers whose mean effect is at least {plateau:.0%} of the peak around it, and one more above: "
                        f"{memit_layers[0]}-{memit_layers[-1]}",
        "memit.mom2_weight": f"λ at which a batch of {batch} known facts' keys is written to a mean fraction "
                             f"{write:.2f} of G(λ+G)⁻¹, G = KᵀC⁻¹K, median over layers "
                             f"{memit_layers[0]}-{memit_layers[-1]}: "
                             + ", ".join(f"L{l} {v['lambda']:,.0f}" for l, v in per_layer.items()),
        "ftl.norm_constraint": f"RMS((W₀k)ᵢ) {eps['rms_output']:.4f} / mean ‖k‖₁ {eps['mean_key_l1']:.2f} over "
                               f"{eps['tokens']:,} corpus keys at layer {rome_layer} = {eps['epsilon']:.5f}; lr = ε",
    }
    return Calibration(
        identity=ModelIdentity.of(lm), model=lm.name, rome={"layer": rome_layer},
        memit={"layers": memit_layers, "mom2_weight": lam}, ftl={"lr": epsilon, "norm_constraint": epsilon},
        evidence=evidence,
        measurements={"layers": layers, "effects": effects.tolist(), "facts": [f["prompt"] for f in facts[:n_facts]],
                      "lambda": {str(k): v for k, v in per_layer.items()}, "epsilon": eps},
        seconds=seconds,
        settings={"n_facts": n_facts, "samples": samples, "window": window, "batch": batch, "stats_tokens": stats_tokens,
                  "plateau": plateau, "write": write, "corpus_tokens": corpus_tokens, "n_boot": n_boot, "seed": seed,
                  "noise": "3s", "torch_threads": torch.get_num_threads()})
